//! A target's outbox: the messages to deliver, in order, in a JSON Lines file, and a cursor
//! file with the offset of the first one not delivered yet. A message is on disk (fsynced)
//! before the action that caused it returns, and leaves the outbox only once its receiver
//! answered 2xx (or it was given up on): delivery is at least once, across restarts.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Past this size, an outbox whose messages are all delivered starts again empty.
const COMPACT_BYTES: u64 = 1 << 20;

pub struct Outbox {
    path: PathBuf,
    cursor_path: PathBuf,
    /// Appends, and compaction, take this lock.
    file: Mutex<File>,
}

impl Outbox {
    /// Opens (or creates, mode 0600) the outbox at `path`.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).read(true).mode(0o600).open(path)?;
        let mut cursor_path = path.as_os_str().to_owned();
        cursor_path.push(".cursor");
        Ok(Self { path: path.to_owned(), cursor_path: cursor_path.into(), file: Mutex::new(file) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, File> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one message (a JSON text without newlines) and syncs it to disk.
    pub fn push(&self, message: &str) -> std::io::Result<()> {
        let mut file = self.lock();
        file.write_all(format!("{message}\n").as_bytes())?;
        file.sync_data()
    }

    /// The offset of the first message not delivered yet.
    pub fn cursor(&self) -> u64 {
        std::fs::read_to_string(&self.cursor_path).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// The message at `cursor` and the offset after it; `None` when there is none yet (a
    /// message being written counts only once its newline is there).
    pub fn next(&self, cursor: u64) -> std::io::Result<Option<(String, u64)>> {
        let mut file = File::open(&self.path)?;
        if file.metadata()?.len() <= cursor {
            return Ok(None);
        }
        file.seek(SeekFrom::Start(cursor))?;
        let mut line = String::new();
        let n = BufReader::new(file).read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            return Ok(None);
        }
        Ok(Some((line.trim_end().to_owned(), cursor + n as u64)))
    }

    /// Records that everything before `cursor` is delivered; returns the cursor to go on
    /// from (0 when the outbox was emptied because it was all delivered and large).
    pub fn commit(&self, cursor: u64) -> std::io::Result<u64> {
        let file = self.lock();
        let cursor = if cursor >= COMPACT_BYTES && file.metadata()?.len() == cursor {
            file.set_len(0)?;
            file.sync_data()?;
            0
        } else {
            cursor
        };
        // Written whole, then renamed over the old one: a crash leaves one or the other.
        let mut tmp = self.cursor_path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(cursor.to_string().as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.cursor_path)?;
        Ok(cursor)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes not delivered yet.
    pub fn backlog(&self, cursor: u64) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len().saturating_sub(cursor)).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_back_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let outbox = Outbox::open(&path).unwrap();
        outbox.push(r#"{"n":1}"#).unwrap();
        outbox.push(r#"{"n":2}"#).unwrap();
        let (first, after) = outbox.next(outbox.cursor()).unwrap().unwrap();
        assert_eq!(first, r#"{"n":1}"#);
        outbox.commit(after).unwrap();
        drop(outbox);
        let outbox = Outbox::open(&path).unwrap();
        let (second, after) = outbox.next(outbox.cursor()).unwrap().unwrap();
        assert_eq!(second, r#"{"n":2}"#);
        assert!(outbox.next(after).unwrap().is_none());
        // A half-written line is not a message yet.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"n\":").unwrap();
        assert!(outbox.next(after).unwrap().is_none());
    }
}
