//! `EXT_SKIP` as the agent keeps it: which destination ports no
//! `EXTERNAL` frontend uses. A bit is cleared before a frontend on its
//! port goes into `EXTERNAL`, and set again only after the last one on it
//! is gone, so the TC path never skips a port it serves.

use skiff_ebpf_common::{EXT_SKIP_WORDS, ServiceKey, skip_bit};

/// The bits and what they are derived from.
pub(super) struct PortSkip {
    /// `EXTERNAL` entries on each port (host byte order index).
    users: Vec<u32>,
    /// The words as the map holds them.
    words: Vec<u64>,
}

impl PortSkip {
    /// The map's words as read (`words`, one per index; missing ones are
    /// zero: nothing skipped), with nothing counted yet.
    pub(super) fn new(mut words: Vec<u64>) -> Self {
        words.resize(EXT_SKIP_WORDS as usize, 0);
        Self {
            users: vec![0; 65_536],
            words,
        }
    }

    fn index(key: &ServiceKey) -> usize {
        usize::from(u16::from_be(key.port))
    }

    /// `key` is in `EXTERNAL` (or about to be).
    pub(super) fn take(&mut self, key: &ServiceKey) {
        let n = &mut self.users[Self::index(key)];
        *n = n.saturating_add(1);
    }

    /// `key` left `EXTERNAL`.
    pub(super) fn free(&mut self, key: &ServiceKey) {
        let n = &mut self.users[Self::index(key)];
        *n = n.saturating_sub(1);
    }

    /// The words to write before `keys` go into `EXTERNAL`: only ports
    /// nothing uses and none of `keys` uses are skipped. Returns (index,
    /// word) for each word that changes.
    pub(super) fn open<'a>(
        &mut self,
        keys: impl IntoIterator<Item = &'a ServiceKey>,
    ) -> Vec<(u32, u64)> {
        let mut next = self.unused();
        for key in keys {
            let (word, bit) = skip_bit(key.port);
            next[word as usize] &= !bit;
        }
        self.changes(next)
    }

    /// The words to write once removals are done: the bit of every port
    /// nothing uses set, every other clear.
    pub(super) fn settle(&mut self) -> Vec<(u32, u64)> {
        let next = self.unused();
        self.changes(next)
    }

    /// A word that could not be written: it is written again next time.
    pub(super) fn unwritten(&mut self, index: u32) {
        if let Some(w) = self.words.get_mut(index as usize) {
            *w = !*w;
        }
    }

    /// A bit set for each port nothing uses.
    fn unused(&self) -> Vec<u64> {
        self.users
            .chunks(64)
            .map(|chunk| {
                chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n == 0)
                    .fold(0u64, |w, (bit, _)| w | 1 << bit)
            })
            .collect()
    }

    /// Takes `next` as the map's words; what differs from before.
    fn changes(&mut self, next: Vec<u64>) -> Vec<(u32, u64)> {
        let out = (0u32..)
            .zip(self.words.iter().zip(&next))
            .filter(|(_, (was, now))| was != now)
            .map(|(i, (_, now))| (i, *now))
            .collect();
        self.words = next;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            addr: [0x0a00_0001, 0, 0, 0],
            port: port.to_be(),
            proto: 6,
            family: 4,
        }
    }

    fn skipped(s: &PortSkip, port: u16) -> bool {
        let (word, bit) = skip_bit(port.to_be());
        s.words[word as usize] & bit != 0
    }

    #[test]
    fn a_port_is_skipped_only_while_no_frontend_uses_it() {
        // A fresh map skips nothing until settled.
        let mut s = PortSkip::new(Vec::new());
        assert!(!skipped(&s, 80));
        let changes = s.settle();
        assert_eq!(changes.len(), EXT_SKIP_WORDS as usize);
        assert!(skipped(&s, 80) && skipped(&s, 30080) && skipped(&s, 0) && skipped(&s, 65_535));

        // Opened before the insert: only its word changes, only its bit.
        let (a, b) = (key(30080), key(30080));
        assert!(s.open([]).is_empty());
        let changes = s.open([&a]);
        assert_eq!(changes, [(30080 / 64, !(1u64 << (30080 % 64)))]);
        assert!(!skipped(&s, 30080) && skipped(&s, 30081));
        s.take(&a);
        s.take(&b);
        assert!(s.settle().is_empty());

        // One of two frontends on the port leaves: still served.
        s.free(&a);
        assert!(s.settle().is_empty());
        assert!(!skipped(&s, 30080));
        s.free(&b);
        assert_eq!(s.settle(), [(30080 / 64, u64::MAX)]);
        assert!(skipped(&s, 30080));
    }

    #[test]
    fn words_read_from_the_map_are_kept_until_settled() {
        // An earlier agent's map: port 8080 served, the rest skipped.
        let mut words = vec![u64::MAX; EXT_SKIP_WORDS as usize];
        words[8080 / 64] &= !(1 << (8080 % 64));
        let mut s = PortSkip::new(words);
        assert!(!skipped(&s, 8080) && skipped(&s, 8081));
        // Its frontend is adopted (counted), so settling changes nothing.
        s.take(&key(8080));
        assert!(s.settle().is_empty());
        // A word that failed to be written is written again.
        s.unwritten(8080 / 64);
        assert_eq!(s.settle(), [(8080 / 64, !(1u64 << (8080 % 64)))]);
    }
}
