//! A Kubernetes uid kept inline: the caches hold one per cached object, and a uid on the
//! heap costs an allocation of its own (about 80 bytes with its pointer and the allocator's
//! overhead) where inline it costs 40.

/// An object's `metadata.uid`: the 36 characters of a UUID inline (every uid the apiserver
/// assigns), anything else on the heap.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Uid {
    Inline([u8; 36]),
    Other(Box<str>),
}

impl Uid {
    pub fn new(uid: &str) -> Self {
        match <[u8; 36]>::try_from(uid.as_bytes()) {
            Ok(bytes) => Uid::Inline(bytes),
            Err(_) => Uid::Other(uid.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Made from a `&str` of exactly these bytes: always UTF-8.
            Uid::Inline(bytes) => std::str::from_utf8(bytes).unwrap_or_default(),
            Uid::Other(s) => s,
        }
    }
}

impl std::ops::Deref for Uid {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Uid {
    fn from(uid: &str) -> Self {
        Uid::new(uid)
    }
}

impl From<String> for Uid {
    fn from(uid: String) -> Self {
        Uid::new(&uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_is_kept_inline_and_anything_else_as_given() {
        let uuid = "0b7c1c52-2d7e-4d5b-9a53-0e8f3c1d2a77";
        let u = Uid::new(uuid);
        assert!(matches!(u, Uid::Inline(_)));
        assert_eq!(&*u, uuid);
        assert_eq!(Some(u).as_deref(), Some(uuid));
        for other in ["", "short", "a-uid-longer-than-thirty-six-characters-!"] {
            let u = Uid::new(other);
            assert!(matches!(u, Uid::Other(_)));
            assert_eq!(u.as_str(), other);
        }
        assert!(std::mem::size_of::<Option<Uid>>() <= 40);
    }
}
