//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for the TC path:
//! a lookup table of prime size in which every backend owns a near-equal
//! share of slots, built only from the backends' identities and a seed, so
//! that every node builds the same table and a backend leaving moves about
//! its own share of flows.
//!
//! Pure logic; the kernel reads the table as an array of backend ids.

use skiff_ebpf_common::{ExtBackend, MAGLEV_SEED};

/// Table sizes a user may configure: primes, so that every permutation
/// visits every slot.
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// FNV-1a, 64 bits, seeded: stable across builds and machines (unlike the
/// standard library's hasher).
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// What names a backend for the permutation: address, port and family,
/// not the node-local flags.
fn identity(b: &ExtBackend) -> [u8; 19] {
    let mut out = [0u8; 19];
    for (i, w) in b.addr.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    out[16..18].copy_from_slice(&b.port.to_ne_bytes());
    out[18] = b.family;
    out
}

/// The table: for each of `size` slots, an index into `backends`. Empty
/// when there are no backends. `size` must be prime and at least the
/// number of backends.
pub fn table(backends: &[ExtBackend], size: u32) -> Vec<u32> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let seed = u64::from(MAGLEV_SEED);
    // Each backend's permutation of the slots: offset + j * skip (mod m).
    let perm: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let id = identity(b);
            let offset = fnv(seed, &id) % m;
            let skip = fnv(seed.rotate_left(32) ^ 0x9e37_79b9, &id) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    // Backends take turns in a fixed order (by identity), each claiming
    // its next preferred free slot.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|i| identity(&backends[*i]));
    let mut next = vec![0u64; n];
    let mut entry = vec![u32::MAX; size as usize];
    let mut filled = 0usize;
    loop {
        for &i in &order {
            let (offset, skip) = perm[i];
            let mut c = (offset + next[i] * skip) % m;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == size as usize {
                return entry;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff_ebpf_common::FAMILY_V4;

    fn backend(i: u32, flags: u8) -> ExtBackend {
        ExtBackend {
            addr: [u32::from_ne_bytes([10, 244, 1, i as u8]), 0, 0, 0],
            port: 8080u16.to_be(),
            family: FAMILY_V4,
            flags,
        }
    }

    fn owners(backends: &[ExtBackend], t: &[u32]) -> Vec<ExtBackend> {
        t.iter()
            .map(|i| {
                let mut b = backends[*i as usize];
                b.flags = 0;
                b
            })
            .collect()
    }

    #[test]
    fn every_backend_gets_a_near_equal_share() {
        let bs: Vec<ExtBackend> = (1..=10).map(|i| backend(i, 0)).collect();
        let t = table(&bs, 16_381);
        assert_eq!(t.len(), 16_381);
        for i in 0..bs.len() as u32 {
            let share = t.iter().filter(|x| **x == i).count();
            assert!((1638..=1639).contains(&share), "backend {i}: {share} slots");
        }
    }

    #[test]
    fn removing_one_of_ten_moves_about_a_tenth_of_the_slots() {
        let bs: Vec<ExtBackend> = (1..=10).map(|i| backend(i, 0)).collect();
        let before = owners(&bs, &table(&bs, 16_381));
        let fewer: Vec<ExtBackend> = bs.iter().copied().filter(|b| *b != bs[3]).collect();
        let after = owners(&fewer, &table(&fewer, 16_381));
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let of_the_rest = before
            .iter()
            .zip(&after)
            .filter(|(a, b)| **a != bs[3] && a != b)
            .count();
        let share = moved as f64 / 16_381.0;
        assert!((0.09..0.13).contains(&share), "{share} of the slots moved");
        // Slots of the nine that stay mostly stay with them.
        assert!(
            (of_the_rest as f64) < 0.03 * 16_381.0,
            "{of_the_rest} slots of staying backends moved"
        );
    }

    #[test]
    fn the_table_depends_on_identities_not_on_order_or_local_flags() {
        let bs: Vec<ExtBackend> = (1..=5).map(|i| backend(i, 0)).collect();
        let mut other: Vec<ExtBackend> = bs.iter().rev().copied().collect();
        other[2].flags = 1;
        assert_eq!(
            owners(&bs, &table(&bs, 251)),
            owners(&other, &table(&other, 251))
        );
    }

    #[test]
    fn primes() {
        assert!(is_prime(16_381) && is_prime(251) && is_prime(2));
        assert!(!is_prime(16_383) && !is_prime(1) && !is_prime(0));
    }
}
