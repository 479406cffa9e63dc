//! The live audit file as a shared memory mapping: a record is copied into the mapping, which
//! puts it in the page cache at once, so that it survives the proxy being killed (`kill -9`)
//! with no `write(2)` at all. Space is reserved ahead with `fallocate` in [`CHUNK`]s, so a full
//! disk is an error at reservation (the statement is refused), never a fault on a page.
//!
//! The file is longer than what was written while it is open: zeros follow the last record.
//! Closing (or rotating) cuts it back; after a crash the next start cuts the zeros off as a torn
//! tail, and readers stop at the first line that does not end in a newline.
//!
//! NOTE: pglease owns the live file. Truncating it from outside while pglease runs (logrotate's
//! `copytruncate`) takes pages away from under the mapping, and the next record faults (SIGBUS):
//! rotate with `audit.rotate_bytes`, which renames.

use std::fs::File;
use std::os::fd::AsRawFd;

use memmap2::{MmapOptions, MmapRaw};

/// Space reserved at a time.
pub const CHUNK: u64 = 8 << 20;

pub struct Segment {
    file: File,
    map: MmapRaw,
    /// Bytes of records in the file.
    len: u64,
    /// The file's length: what `fallocate` reserved.
    reserved: u64,
    /// Where records are flushed to disk up to (`fsync` mode).
    synced: u64,
}

impl Segment {
    /// Maps `file`, whose records end at its current length, with room for `capacity` bytes, and
    /// reserves the first chunk: a file system without `fallocate` fails here, not at a record.
    pub fn open(file: File, capacity: u64) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let map = Self::map(&file, capacity.max(len + CHUNK))?;
        let mut segment = Self { file, map, len, reserved: len, synced: len };
        segment.reserve(len + 1)?;
        Ok(segment)
    }

    /// Makes the file at least `end` bytes long, in whole chunks, with blocks behind them.
    fn reserve(&mut self, end: u64) -> std::io::Result<()> {
        if end > self.reserved {
            let want = (end - self.reserved).div_ceil(CHUNK) * CHUNK;
            // SAFETY: a plain syscall on a file descriptor we own.
            let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, self.reserved as libc::off_t, want as libc::off_t) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            self.reserved += want;
        }
        Ok(())
    }

    fn map(file: &File, len: u64) -> std::io::Result<MmapRaw> {
        let len = usize::try_from(len).map_err(|_| std::io::Error::other("audit segment too large to map"))?;
        MmapOptions::new().len(len).map_raw(file)
    }

    /// Appends `bytes`. All or nothing: space is reserved first, and only a reservation fails.
    pub fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let end = self.len + bytes.len() as u64;
        self.reserve(end)?;
        if end > self.map.len() as u64 {
            self.map = Self::map(&self.file, end.max(2 * self.map.len() as u64))?;
        }
        // Readers of the live file take a line as whole once its newline is there. `memcpy` does
        // not store front to back (nor in order, with non-temporal stores), so each line is
        // copied without its newline, fenced, and then given its newline.
        let mut at = self.len as usize;
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            let (body, newline) = match line.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (line, false),
            };
            // SAFETY: [len, end) lies inside the mapping (just grown if needed) and inside the
            // file (just reserved), so no page of it can fault; only this segment writes it.
            unsafe {
                let to = self.map.as_mut_ptr().add(at);
                std::ptr::copy_nonoverlapping(body.as_ptr(), to, body.len());
                if newline {
                    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                    std::ptr::write_volatile(to.add(body.len()), b'\n');
                }
            }
            at += line.len();
        }
        self.len = end;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// The file, for a flush from another thread.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Flushes what was appended since the last call to disk (and the file's new length).
    /// One `msync(MS_SYNC)`: on Linux that is `fdatasync` of the range (`vfs_fsync_range`, with
    /// the metadata needed to read it back, such as a length a reservation grew); an
    /// `fdatasync` after it flushed again for nothing (a quarter of each flush's time here).
    pub fn sync(&mut self) -> std::io::Result<()> {
        if self.synced == self.len {
            return Ok(());
        }
        let page = 4096;
        let from = (self.synced / page) * page;
        self.map.flush_range(from as usize, (self.len - from) as usize)?;
        self.synced = self.len;
        Ok(())
    }

    /// Takes back `[to, len)` after a failed flush: zeroed, so no reader takes it for records.
    pub fn cut_back(&mut self, to: u64) {
        if to < self.len {
            // SAFETY: [to, len) was written by `append`, so it is mapped and reserved.
            unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(to as usize), 0, (self.len - to) as usize) };
            self.len = to;
            self.synced = self.synced.min(to);
        }
    }

    /// Cuts the zeros after the last record off (on drop) and gives the file back, for the
    /// rotated file's flush.
    pub fn close(self) -> std::io::Result<File> {
        let file = self.file.try_clone()?;
        drop(self);
        Ok(file)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // `close` took the file already when it ran; this covers every other way out.
        let _ = self.file.set_len(self.len);
    }
}
