//! User-namespace id maps: the `inside outside count` lines of /proc/PID/uid_map and gid_map,
//! read, checked and written by the sandbox and the unpacker.

/// One line of a map: the first id inside, the first id outside, how many.
pub type IdRange = (u32, u32, u32);

pub fn parse(text: &str) -> Vec<IdRange> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace().map(|f| f.parse::<u32>());
            match (fields.next(), fields.next(), fields.next()) {
                (Some(Ok(i)), Some(Ok(o)), Some(Ok(c))) => Some((i, o, c)),
                _ => None,
            }
        })
        .collect()
}

/// The map in `file` (e.g. /proc/self/uid_map).
pub fn read(file: &str) -> Result<Vec<IdRange>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    Ok(parse(&text))
}

/// Whether `id` (inside) is mapped.
pub fn covers(ranges: &[IdRange], id: u32) -> bool {
    ranges
        .iter()
        .any(|&(inside, _, count)| id >= inside && (id - inside) < count)
}

/// The text to write to a map file.
pub fn format(ranges: &[IdRange]) -> String {
    ranges
        .iter()
        .map(|(i, o, c)| format!("{i} {o} {c}\n"))
        .collect()
}

/// Whether every id of `first..first + count` (inside) is mapped, by one line or several
/// (`0 1000 1` and `1 100000 65535` together map 0–65535).
pub fn covers_all(ranges: &[IdRange], first: u32, count: u32) -> bool {
    let mut next = u64::from(first);
    let end = u64::from(first) + u64::from(count);
    while next < end {
        let Some(&(inside, _, n)) = ranges.iter().find(|&&(inside, _, n)| {
            u64::from(inside) <= next && next < u64::from(inside) + u64::from(n)
        }) else {
            return false;
        };
        next = u64::from(inside) + u64::from(n);
    }
    true
}

/// Whether this process's user namespace maps every uid and gid of 0–65535, the ids images
/// use (so that chown to an image's owners can work): the host's, or a user namespace with a
/// subordinate range (lathe's own, or a rootless container's).
pub fn own_namespace_maps_image_ids() -> bool {
    let all = |file: &str| read(file).is_ok_and(|ranges| covers_all(&ranges, 0, 65536));
    all("/proc/self/uid_map") && all("/proc/self/gid_map")
}

/// Whether this process's user namespace maps `uid` and `gid`.
pub fn own_namespace_maps(uid: u32, gid: u32) -> bool {
    let mapped = |file: &str, id: u32| read(file).is_ok_and(|ranges| covers(&ranges, id));
    mapped("/proc/self/uid_map", uid) && mapped("/proc/self/gid_map", gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_parse_and_cover() {
        let host = parse("         0          0 4294967295\n");
        assert!(covers(&host, 1001));
        let rootless = parse("0 1000 1\n1 100000 65536\n");
        assert_eq!(rootless, vec![(0, 1000, 1), (1, 100_000, 65536)]);
        assert!(covers(&rootless, 65536) && !covers(&rootless, 65537));
        assert!(!covers(&parse("0 1000 1"), 1001));
        assert_eq!(format(&rootless), "0 1000 1\n1 100000 65536\n");
    }

    #[test]
    fn image_ids_may_be_mapped_by_several_lines() {
        assert!(covers_all(&parse("0 0 4294967295"), 0, 65536));
        assert!(covers_all(&parse("0 1000 1\n1 100000 65535"), 0, 65536));
        assert!(covers_all(&parse("1 100000 65535\n0 1000 1"), 0, 65536));
        assert!(!covers_all(&parse("0 1000 1\n1 100000 65534"), 0, 65536));
        assert!(!covers_all(&parse("0 1000 1\n2 100000 65534"), 0, 65536));
        assert!(!covers_all(&parse("0 1000 1"), 0, 65536));
        assert!(!covers_all(&[], 0, 1));
        assert!(covers_all(&[], 5, 0));
    }
}
