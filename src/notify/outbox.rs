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
    /// Opens (or creates, mode 0600) the outbox at `path`, which no other process may have
    /// open. What a crash left behind is put right: a last line without its newline (a push
    /// cut short) is dropped, and a cursor that is not at the start of a message goes back to
    /// the start (messages are sent again rather than lost).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let file = OpenOptions::new().create(true).append(true).read(true).mode(0o600).open(path)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::other(format!("{} is in use by another process (each instance needs an outbox of its own)", path.display())));
        }
        let content = std::fs::read(path)?;
        let whole = content.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if whole < content.len() {
            file.set_len(whole as u64)?;
            file.sync_data()?;
        }
        let mut cursor_path = path.as_os_str().to_owned();
        cursor_path.push(".cursor");
        let outbox = Self { path: path.to_owned(), cursor_path: cursor_path.into(), file: Mutex::new(file) };
        let cursor = outbox.cursor() as usize;
        if cursor > whole || (cursor > 0 && content[cursor - 1] != b'\n') {
            outbox.write_cursor(0)?;
        }
        Ok(outbox)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, File> {
        self.file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one message (a JSON text without newlines) and syncs it to disk. A push that
    /// fails leaves nothing behind (the next one would be glued to it).
    pub fn push(&self, message: &str) -> std::io::Result<()> {
        let mut file = self.lock();
        let before = file.metadata()?.len();
        let written = file.write_all(format!("{message}\n").as_bytes()).and_then(|()| file.sync_data());
        if written.is_err() {
            let _ = file.set_len(before);
        }
        written
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
        {
            let file = self.lock();
            if cursor >= COMPACT_BYTES && file.metadata()?.len() == cursor {
                // The cursor first: a crash in between sends the old messages again, never
                // skips new ones.
                self.write_cursor(0)?;
                file.set_len(0)?;
                file.sync_data()?;
                return Ok(0);
            }
        }
        self.write_cursor(cursor)?;
        Ok(cursor)
    }

    /// Written whole, then renamed over the old one, and the directory synced: after a crash
    /// the cursor is one or the other.
    fn write_cursor(&self, cursor: u64) -> std::io::Result<()> {
        let mut tmp = self.cursor_path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(cursor.to_string().as_bytes())?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.cursor_path)?;
        let dir = self.cursor_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
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
        // Another process cannot share it.
        assert!(Outbox::open(&path).is_err());
    }

    #[test]
    fn what_a_crash_leaves_is_put_right_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        // A push cut short: dropped, so the next message is whole.
        std::fs::write(&path, "{\"n\":1}\n{\"n\":").unwrap();
        let outbox = Outbox::open(&path).unwrap();
        outbox.push(r#"{"n":2}"#).unwrap();
        let (first, after) = outbox.next(0).unwrap().unwrap();
        let (second, _) = outbox.next(after).unwrap().unwrap();
        assert_eq!((first.as_str(), second.as_str()), (r#"{"n":1}"#, r#"{"n":2}"#));
        drop(outbox);
        // A cursor past the end (the file emptied, its cursor not yet written): from the start.
        std::fs::write(dir.path().join("out.jsonl.cursor"), "1000").unwrap();
        let outbox = Outbox::open(&path).unwrap();
        assert_eq!(outbox.cursor(), 0);
        drop(outbox);
        // A cursor in the middle of a message: from the start, too.
        std::fs::write(dir.path().join("out.jsonl.cursor"), "3").unwrap();
        assert_eq!(Outbox::open(&path).unwrap().cursor(), 0);
    }
}
