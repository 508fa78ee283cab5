//! The webhook front: the connections with their deadlines and caps ([`listener`], bound by
//! [`listen`]), the HTTPS routes and the admin endpoint ([`server`]), the serving certificate
//! and its reload ([`tls`], [`certs`]), the AdmissionReview in and out ([`review`]) and the
//! JSON patch written into the machine ([`patch`]). It decides nothing about addresses:
//! [`crate::assign`] does.

pub mod auth;
pub mod certs;
pub mod listen;
pub mod listener;
pub mod patch;
pub mod review;
pub mod server;
pub mod tls;
