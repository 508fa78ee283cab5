#![allow(dead_code)]
pub mod controlplane;
pub mod webhook;
