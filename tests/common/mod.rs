#![allow(dead_code)]
pub mod child;
pub mod controllers;
pub mod controlplane;
pub mod life;
pub mod metal3;
pub mod tools;
pub mod util;
pub mod webhook;
