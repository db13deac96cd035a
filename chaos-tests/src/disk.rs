//! A node's data directory on a small loop-mounted ext4 filesystem of its
//! own, for power cuts and full disks.
//!
//! A power cut is simulated by copying the backing file while the node is
//! dead: what the filesystem has synced to its device is in the copy, what
//! still sat in its page cache is not. The copy is then checked and mounted in
//! place of the original. The journal commits only every 30 s (`commit=30`),
//! so unsynced writes of the last seconds are reliably lost — exactly the
//! writes an acknowledgement must never depend on.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A loop-mounted ext4 filesystem.
#[derive(Debug)]
pub struct LoopFs {
    image: PathBuf,
    mount: PathBuf,
    mounted: bool,
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {program}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl LoopFs {
    /// Creates a `size_mb` filesystem in `image` and mounts it on `mount`.
    pub fn create(image: &Path, mount: &Path, size_mb: u64) -> anyhow::Result<LoopFs> {
        std::fs::create_dir_all(mount)?;
        let f = std::fs::File::create(image)?;
        f.set_len(size_mb * 1024 * 1024)?;
        drop(f);
        run("mkfs.ext4", &["-q", "-F", path(image)])?;
        let mut fs = LoopFs {
            image: image.to_path_buf(),
            mount: mount.to_path_buf(),
            mounted: false,
        };
        fs.mount()?;
        Ok(fs)
    }

    /// Whether loop mounts work here (root, loop devices, mkfs.ext4).
    pub fn available() -> bool {
        let Ok(dir) = tempfile::tempdir() else {
            return false;
        };
        LoopFs::create(&dir.path().join("probe.img"), &dir.path().join("mnt"), 16).is_ok()
    }

    fn mount(&mut self) -> anyhow::Result<()> {
        run(
            "mount",
            &["-o", "loop,commit=30", path(&self.image), path(&self.mount)],
        )?;
        self.mounted = true;
        Ok(())
    }

    fn unmount(&mut self) {
        if self.mounted {
            let _ = run("umount", &[path(&self.mount)]);
            self.mounted = false;
        }
    }

    /// Simulates a power cut under a dead process: only what was synced survives.
    pub fn power_cut(&mut self) -> anyhow::Result<()> {
        let copy = self.image.with_extension("cut");
        run("cp", &["--sparse=always", path(&self.image), path(&copy)])?;
        self.unmount();
        std::fs::rename(&copy, &self.image)?;
        // Exit codes 1 and 2 mean "errors corrected": the journal was replayed.
        let _ = Command::new("e2fsck")
            .args(["-p", path(&self.image)])
            .stdin(Stdio::null())
            .output();
        self.mount()
    }

    /// Fills the filesystem, leaving about `leave_kb` KiB free (0: full).
    pub fn fill(&self, leave_kb: u64) -> anyhow::Result<()> {
        let filler = self.filler();
        let stat = nix::sys::statvfs::statvfs(&self.mount)?;
        // Nodes run as root in the tests, and root may use the reserved blocks too.
        let free = stat.blocks_free() * stat.fragment_size();
        let want = free.saturating_sub(leave_kb * 1024).max(4096);
        if let Err(e) = run("fallocate", &["-l", &want.to_string(), path(&filler)]) {
            // Whatever part was allocated still fills the disk; keep it (see `unfill`).
            let got = std::fs::metadata(&filler).map(|m| m.len()).unwrap_or(0);
            anyhow::ensure!(got > 0, "{e}");
        }
        Ok(())
    }

    /// Frees what [`LoopFs::fill`] took.
    pub fn unfill(&self) {
        let _ = std::fs::remove_file(self.filler());
    }

    fn filler(&self) -> PathBuf {
        self.mount.join("filler")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.unmount();
        let _ = std::fs::remove_file(&self.image);
    }
}
