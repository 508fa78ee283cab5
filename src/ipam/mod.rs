//! Pure IP address management: metal3 IPPool parsing and address arithmetic ([`pool`]), pool
//! selection for a device ([`select`]) and per-pool allocation state ([`allocate`]). No I/O.

pub mod allocate;
pub mod interval;
pub mod pool;
pub mod select;

pub use allocate::{AllocError, Exhausted, PoolState};
pub use pool::{
    Pool, PoolError, PoolInput, Range, RangeInput, Strategy, address_name, netmask, parse_pool,
};
pub use select::{DeviceRequest, NoPool, PoolKey, PoolMeta, Rule, Selection, select};
