//! Test-only fault points: the process dies (or waits) at a named boundary of a write chain,
//! so that integration tests can check what a crash at that instant leaves behind.
//!
//! Compiled in only with the cargo feature `fault-points`, which the test builds enable (a
//! dev-dependency of the crate on itself) and the release binary never has (`make release`,
//! `make image` and `cargo build --release` build without it). Without the feature every
//! function here is an empty inline function.
//!
//! With the feature, two environment variables arm them, read on each hit:
//! - `CAPE_STATIC_IP_FAULT_POINT=NAME` aborts the process (as abruptly as SIGKILL: no
//!   destructor, no flush, no answer) at the first hit of the point NAME; `NAME:N` at its N-th
//!   hit (counted from the start of the process);
//! - `CAPE_STATIC_IP_FAULT_DELAY=NAME=DURATION` (humantime, `NAME:N=DURATION` for the N-th
//!   hit only; several separated by commas) makes [`delay`] wait that long at the point;
//! - `CAPE_STATIC_IP_FAULT_FAIL=NAME` (or `NAME:N`) makes [`fails`] true at that hit: the
//!   write before it went through but its answer counts as lost (`after-claim-delete`);
//! - `CAPE_STATIC_IP_FAULT_CLOCK_OFFSET=DURATION` (`-DURATION` for behind) shifts the wall
//!   clock [`now`] returns, as on a replica whose clock is wrong.
//!
//! Points (the admission write chain, then release):
//! `after-address`, `after-claim`, `after-claim-status`, `before-answer`,
//! `after-claim-delete`, `after-address-delete`, `before-finalizer-removal`.
//!
//! Delay points: `before-answer`, `after-address` (an address created, its claim not yet),
//! `after-address-take-over` (an address without its claim taken over, its claim not yet
//! created), `sweep-decided` (a sweep read the claim and machine live, before its delete),
//! `release-read` (a release read its machine live, before it deletes anything),
//! `claim-watch`, `address-watch`, `pool-watch` (each change of that watch waits before it
//! is applied: that cache lags behind the others).

/// The wall clock, for the timestamps this project writes (events, `leased-at`,
/// `released-at`, a pool's `lastUpdated`). No age or deadline is ever computed from it: ages
/// are measured on the monotonic clock. With the feature, `CAPE_STATIC_IP_FAULT_CLOCK_OFFSET`
/// (humantime, `-` in front for behind, e.g. `1h` or `-1h`) shifts it, as a replica whose
/// clock is wrong would see it.
#[inline]
pub fn now() -> k8s_openapi::jiff::Timestamp {
    let now = k8s_openapi::jiff::Timestamp::now();
    #[cfg(feature = "fault-points")]
    let now = armed::shifted(now);
    now
}

/// Dies here when armed (see the module comment).
#[inline]
pub fn point(name: &'static str) {
    #[cfg(feature = "fault-points")]
    armed::point(name);
    #[cfg(not(feature = "fault-points"))]
    let _ = name;
}

/// True when armed to fail here: the caller then acts as if the answer of the write just made
/// were lost (see the module comment).
#[inline]
pub fn fails(name: &'static str) -> bool {
    #[cfg(feature = "fault-points")]
    return armed::fails(name);
    #[cfg(not(feature = "fault-points"))]
    {
        let _ = name;
        false
    }
}

/// Waits here when armed (see the module comment). Without the feature the future is ready
/// at once and the name is not kept.
#[inline]
pub fn delay(name: &'static str) -> impl std::future::Future<Output = ()> {
    #[cfg(feature = "fault-points")]
    return armed::delay(name);
    #[cfg(not(feature = "fault-points"))]
    {
        let _ = name;
        std::future::ready(())
    }
}

#[cfg(feature = "fault-points")]
mod armed {
    use std::collections::HashMap;
    use std::sync::Mutex;

    pub const POINT_VAR: &str = "CAPE_STATIC_IP_FAULT_POINT";
    pub const DELAY_VAR: &str = "CAPE_STATIC_IP_FAULT_DELAY";
    pub const CLOCK_VAR: &str = "CAPE_STATIC_IP_FAULT_CLOCK_OFFSET";
    pub const FAIL_VAR: &str = "CAPE_STATIC_IP_FAULT_FAIL";

    /// `now` shifted by the offset the environment sets, if any.
    pub fn shifted(now: k8s_openapi::jiff::Timestamp) -> k8s_openapi::jiff::Timestamp {
        let Ok(spec) = std::env::var(CLOCK_VAR) else {
            return now;
        };
        let (behind, text) = match spec.trim().strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, spec.trim().trim_start_matches('+')),
        };
        let Ok(offset) = humantime::parse_duration(text) else {
            return now;
        };
        let shifted = if behind {
            now.checked_sub(offset)
        } else {
            now.checked_add(offset)
        };
        shifted.unwrap_or(now)
    }

    static HITS: Mutex<Option<HashMap<(&'static str, &'static str), u64>>> = Mutex::new(None);

    /// Counts one hit of `name` for `var`; returns the hit's number (1-based).
    fn hit(var: &'static str, name: &'static str) -> u64 {
        let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
        let n = hits
            .get_or_insert_with(HashMap::new)
            .entry((var, name))
            .or_default();
        *n += 1;
        *n
    }

    /// Whether `spec` (`NAME` or `NAME:N`) names this hit of `name`.
    pub fn matches(spec: &str, name: &str, nth: u64) -> bool {
        match spec.split_once(':') {
            None => spec == name && nth == 1,
            Some((n, count)) => n == name && count.parse() == Ok(nth),
        }
    }

    pub fn fails(name: &'static str) -> bool {
        let Ok(spec) = std::env::var(FAIL_VAR) else {
            return false;
        };
        if !spec.starts_with(name) {
            return false;
        }
        let nth = hit(FAIL_VAR, name);
        let failing = matches(&spec, name, nth);
        if failing {
            eprintln!("fault point {name} (hit {nth}): failing");
        }
        failing
    }

    pub fn point(name: &'static str) {
        let Ok(spec) = std::env::var(POINT_VAR) else {
            return;
        };
        if !spec.starts_with(name) {
            return;
        }
        let nth = hit(POINT_VAR, name);
        if matches(&spec, name, nth) {
            eprintln!("fault point {name} (hit {nth}): aborting");
            std::process::abort();
        }
    }

    pub async fn delay(name: &'static str) {
        let Ok(value) = std::env::var(DELAY_VAR) else {
            return;
        };
        if !value.contains(name) {
            return;
        }
        let nth = hit(DELAY_VAR, name);
        for item in value.split(',') {
            let Some((spec, duration)) = item.split_once('=') else {
                continue;
            };
            let Ok(duration) = humantime::parse_duration(duration.trim()) else {
                continue;
            };
            let spec = spec.trim();
            if spec == name || matches(spec, name, nth) {
                eprintln!("fault point {name} (hit {nth}): waiting {duration:?}");
                tokio::time::sleep(duration).await;
                return;
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::matches;

        #[test]
        fn specs() {
            assert!(matches("after-address", "after-address", 1));
            assert!(!matches("after-address", "after-address", 2));
            assert!(matches("after-address:3", "after-address", 3));
            assert!(!matches("after-address:3", "after-address", 2));
            assert!(!matches("after-claim", "after-claim-status", 1));
            assert!(!matches("after-claim:1", "after-claim-status", 1));
        }
    }
}
