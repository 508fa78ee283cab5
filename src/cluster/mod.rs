//! Everything that talks to the Kubernetes API: typed resources, watch caches, the
//! in-memory allocation index they feed, and the writer.

pub mod cache;
pub mod certmanager;
pub mod claims;
pub mod crd;
pub mod index;
pub mod intern;
pub mod uid;
pub mod writer;
