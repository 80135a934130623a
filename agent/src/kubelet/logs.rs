//! Container logs in the CRI format (`<RFC 3339 nano time> <stream> <F|P>
//! <text>`, one line each, P for a line cut at 16 KiB), under
//! `<log dir>/<ns>_<pod>_<uid>/<container>/<restart>.log`.
//!
//! Writing: containerd's shim starts `skiff-log` (a `binary://` log URI)
//! with the container's stdout and stderr on fds 3 and 4; it lives as long
//! as the container, so logs keep flowing while the kubelet restarts.
//! Reading: [`read`] turns a file back into what `kubectl logs` shows,
//! with `tailLines`, `timestamps`, `sinceSeconds` and `limitBytes`.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

/// Lines longer than this are cut into partial (P) lines, as upstream's
/// CRI runtimes do.
pub const MAX_LINE: usize = 16 * 1024;

/// The directory of one pod's logs.
pub fn pod_dir(log_dir: &Path, namespace: &str, name: &str, uid: &str) -> PathBuf {
    log_dir.join(format!("{namespace}_{name}_{uid}"))
}

/// Upstream's defaults: `containerLogMaxSize` 10 MiB, `containerLogMaxFiles` 5.
pub const MAX_SIZE: u64 = 10 << 20;
pub const MAX_FILES: usize = 5;

/// The log URI handed to containerd for one container run: the file, and
/// the size at which it is rotated.
pub fn uri(driver: &Path, file: &Path, max_size: u64) -> String {
    // containerd passes each query key, then its value, as arguments.
    format!(
        "binary://{}?{}={max_size}",
        driver.display(),
        file.display()
    )
}

/// A log file that rotates by size: past `max_size` it is renamed to
/// `<file>.<n>` (the newest rotation has the highest n) and a fresh one is
/// opened; only the newest `MAX_FILES - 1` rotations are kept.
pub struct Rotating {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    max_size: u64,
}

impl Rotating {
    pub fn open(path: &Path, max_size: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            written,
            max_size: max_size.max(4096),
        })
    }

    fn rotations(&self) -> Vec<(u64, PathBuf)> {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        let k = n.strip_prefix(&name)?.strip_prefix('.')?.parse().ok()?;
                        Some((k, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    pub fn write_record(&mut self, rec: &[u8]) -> std::io::Result<()> {
        if self.written > 0 && self.written + rec.len() as u64 > self.max_size {
            let rotations = self.rotations();
            let next = rotations.last().map(|(n, _)| n + 1).unwrap_or(1);
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(format!(".{next}"));
            std::fs::rename(&self.path, &rotated)?;
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.written = 0;
            let keep = MAX_FILES.saturating_sub(1);
            let mut all = rotations;
            all.push((next, PathBuf::from(rotated)));
            for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
                let _ = std::fs::remove_file(old);
            }
        }
        self.file.write_all(rec)?;
        self.written += rec.len() as u64;
        Ok(())
    }
}

/// Formats one record.
pub fn record(out: &mut Vec<u8>, time: &str, stream: &str, text: &[u8], complete: bool) {
    out.extend_from_slice(time.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_bytes());
    out.extend_from_slice(if complete { b" F " } else { b" P " });
    out.extend_from_slice(text);
    out.push(b'\n');
}

pub fn now_nano() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        .to_string()
}

/// Copies `input` into `file` as CRI records of `stream` until EOF.
pub fn copy_stream(
    input: impl std::io::Read,
    stream: &str,
    file: &std::sync::Mutex<Rotating>,
) -> std::io::Result<()> {
    let mut reader = std::io::BufReader::with_capacity(MAX_LINE, input);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let n = std::io::Read::take(&mut reader, MAX_LINE as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        }
        let mut rec = Vec::with_capacity(line.len() + 48);
        record(&mut rec, &now_nano(), stream, &line, complete);
        let mut f = file
            .lock()
            .map_err(|_| std::io::Error::other("log file lock poisoned"))?;
        f.write_record(&rec)?;
    }
}

/// What `kubectl logs` asks for.
#[derive(Clone, Debug, Default)]
pub struct ReadOptions {
    pub tail_lines: Option<usize>,
    pub timestamps: bool,
    /// Only records at or after this time (RFC 3339).
    pub since: Option<String>,
    pub limit_bytes: Option<usize>,
}

/// One parsed record: time, stream, complete, text.
pub fn parse(line: &str) -> Option<(&str, &str, bool, &str)> {
    let mut p = line.splitn(4, ' ');
    let time = p.next()?;
    let stream = p.next()?;
    let tag = p.next()?;
    let text = p.next().unwrap_or("");
    Some((time, stream, tag.starts_with('F'), text))
}

/// The text of CRI records as `kubectl logs` shows it.
pub fn render(content: &str, opts: &ReadOptions) -> String {
    use k8s_openapi::jiff::Timestamp;
    let since: Option<Timestamp> = opts.since.as_deref().and_then(|s| s.parse().ok());
    let mut lines: Vec<String> = Vec::new();
    let mut partial = String::new();
    for l in content.lines() {
        let Some((time, _stream, complete, text)) = parse(l) else {
            continue;
        };
        // Times differ in their number of fractional digits: compare them
        // as times, not text.
        if let Some(s) = since
            && time.parse::<Timestamp>().is_ok_and(|t| t < s)
        {
            continue;
        }
        partial.push_str(text);
        if complete {
            let text = std::mem::take(&mut partial);
            lines.push(if opts.timestamps {
                format!("{time} {text}\n")
            } else {
                format!("{text}\n")
            });
        }
    }
    let start = opts
        .tail_lines
        .map(|n| lines.len().saturating_sub(n))
        .unwrap_or(0);
    let mut out: String = lines[start..].concat();
    if let Some(limit) = opts.limit_bytes
        && out.len() > limit
    {
        let mut cut = limit;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// The text of `file` from byte `offset` on.
pub async fn read_from(file: &Path, offset: usize) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
    let mut f = tokio::fs::File::open(file).await?;
    f.seek(std::io::SeekFrom::Start(offset as u64)).await?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The log directory of a container of the newest pod of that name.
pub fn container_dir(log_dir: &Path, ns: &str, pod: &str, container: &str) -> Option<PathBuf> {
    let prefix = format!("{ns}_{pod}_");
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(log_dir)
        .ok()?
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix(&prefix)
                .is_some_and(|uid| !uid.contains('_'))
        })
        .filter_map(|e| {
            let d = e.path().join(container);
            let t = std::fs::metadata(&d).and_then(|m| m.modified()).ok()?;
            Some((t, d))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, d)| d)
}

/// `<restart>.log` files of a container, oldest first.
pub fn restarts(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut runs: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name.strip_suffix(".log")?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    runs.sort();
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_partial_lines_and_tails() {
        let mut buf = Vec::new();
        record(&mut buf, "2026-01-01T00:00:00.1Z", "stdout", b"one", true);
        record(&mut buf, "2026-01-01T00:00:01.1Z", "stderr", b"tw", false);
        record(&mut buf, "2026-01-01T00:00:01.2Z", "stderr", b"o", true);
        record(&mut buf, "2026-01-01T00:00:02.1Z", "stdout", b"three", true);
        let text = String::from_utf8(buf).expect("utf8");
        assert_eq!(render(&text, &ReadOptions::default()), "one\ntwo\nthree\n");
        let tail = ReadOptions {
            tail_lines: Some(2),
            timestamps: true,
            ..Default::default()
        };
        assert_eq!(
            render(&text, &tail),
            "2026-01-01T00:00:01.2Z two\n2026-01-01T00:00:02.1Z three\n"
        );
        let since = ReadOptions {
            since: Some("2026-01-01T00:00:02Z".into()),
            ..Default::default()
        };
        assert_eq!(render(&text, &since), "three\n");
    }

    #[test]
    fn long_lines_are_cut_into_partials() {
        let long = vec![b'x'; MAX_LINE + 10];
        let mut input = long.clone();
        input.push(b'\n');
        let dir = std::env::temp_dir().join(format!("skiff-log-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let f = std::sync::Mutex::new(Rotating::open(&dir, MAX_SIZE).expect("file"));
        copy_stream(&input[..], "stdout", &f).expect("copy");
        let text = std::fs::read_to_string(&dir).expect("read");
        let _ = std::fs::remove_file(&dir);
        let tags: Vec<bool> = text.lines().filter_map(|l| parse(l).map(|p| p.2)).collect();
        assert_eq!(tags, vec![false, true]);
        assert_eq!(render(&text, &ReadOptions::default()).len(), long.len() + 1);
    }

    #[test]
    fn files_rotate_by_size_and_old_rotations_go() {
        let dir = std::env::temp_dir().join(format!("skiff-rot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("0.log");
        let mut r = Rotating::open(&path, 4096).expect("open");
        let rec = vec![b'x'; 1000];
        for _ in 0..40 {
            r.write_record(&rec).expect("write");
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .expect("read")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        // 40 KB in files of at most 4 KB: the current one and the newest
        // four rotations stay.
        assert_eq!(names.len(), MAX_FILES, "{names:?}");
        assert!(names.contains(&"0.log".to_string()));
        assert!(std::fs::metadata(&path).expect("current").len() <= 4096);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
