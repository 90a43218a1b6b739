//! Where a message stands in its group's stream: the group's [`Epoch`] and the
//! message's offset in it, together a [`StreamPosition`]. Stores assign them,
//! the sequencer delivers in their order, recovery compares them, and the
//! protocol puts them on the wire; they travel as these types, not as bare
//! strings and integers.

use std::fmt;
use std::sync::Arc;

/// A group's epoch: an opaque name for one unbroken run of its history. It
/// changes whenever the history is lost or reset (a flush, an in-memory store
/// restarting), and offsets restart at 1 in a new epoch, so a client that saw
/// another epoch knows its offsets mean nothing here.
///
/// Cheap to clone (a shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// An epoch with this name.
    pub fn new(name: &str) -> Self {
        Epoch(Arc::from(name))
    }

    /// The epoch the built-in stores give a group: the store instance's id, how
    /// many times the whole store was flushed, and how many times this group
    /// was reset since (`{instance}-{flushes}.{generation}`).
    pub fn from_parts(instance: &str, flushes: u64, generation: u64) -> Self {
        Epoch(Arc::from(format!("{instance}-{flushes}.{generation}")))
    }

    /// The epoch's name, as clients see it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl From<&str> for Epoch {
    fn from(name: &str) -> Self {
        Epoch::new(name)
    }
}

impl From<String> for Epoch {
    fn from(name: String) -> Self {
        Epoch(Arc::from(name))
    }
}

impl AsRef<str> for Epoch {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Epoch {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<String> for Epoch {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<&str> for Epoch {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl serde::Serialize for Epoch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Epoch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Epoch::from)
    }
}

/// A position in a group's stream: an offset within an epoch. Offset 0 is the
/// position before the first message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct StreamPosition {
    /// The epoch the offset belongs to.
    pub epoch: Epoch,
    /// The offset; 0 before the first message.
    pub offset: u64,
}

impl StreamPosition {
    /// The position `offset` in `epoch`.
    pub fn new(epoch: Epoch, offset: u64) -> Self {
        StreamPosition { epoch, offset }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_compare_by_name_and_print_as_it() {
        let e = Epoch::from_parts("ab12", 3, 7);
        assert_eq!(e.as_str(), "ab12-3.7");
        assert_eq!(e.to_string(), "ab12-3.7");
        assert_eq!(e, "ab12-3.7");
        assert_eq!(e, Epoch::from("ab12-3.7".to_owned()));
        assert_ne!(e, Epoch::from_parts("ab12", 3, 8));
        assert_eq!(format!("{e:?}"), "\"ab12-3.7\"");
    }
}
