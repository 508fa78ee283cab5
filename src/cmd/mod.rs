//! The binary's commands: `serve` (the webhook and its background loops), `pools` (a table of
//! every IPPool's use) and `certs` (development certificates, in [`crate::webhook::certs`]).

pub mod pools;
pub mod serve;
