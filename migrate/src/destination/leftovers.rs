//! What a `receive` that crashed (or was killed) left behind, removed when
//! the next one starts in the same `--dir`.
//!
//! An attempt journals, before it creates any file, a record naming its
//! process ([`Owner`](crate::journal::Owner): pid, start time, boot) and the files it will create
//! (incoming images, final names reserved). At start, every record whose
//! process is gone (another boot, no such pid, or a pid now used by a
//! process that started at another time) is stale:
//!
//! - not committed (`receiving`, `ready`, `aborted`): its incoming images
//!   are removed, so are its reservations (the empty files at the final
//!   names, only while they are still the very files it created), and the
//!   record says `aborted` (a settle query then answers "not committed");
//! - committed: the VM's data are never removed; a reservation left at an
//!   incoming name by an installation cut short is, and an image still at
//!   its incoming name is reported.
//!
//! A record of a live process (another `receive` sharing the directory) is
//! left alone. Chunks of such attempts need nothing: they sit in the store
//! under the attempt's expiring root. Control sockets (`wanmig-*.sock` in
//! `--dir`) that nobody serves any more are removed too.

use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::journal::{DestJournal, DestPhase, FileId, ImageRecord};

/// Removes what stale attempts journalled in `journal` left, and stale
/// control sockets in `dir`; tells `log` what it did.
pub fn clean(journal: &DestJournal, dir: &Path, log: &mut dyn FnMut(String)) {
    for rec in journal.records() {
        let mut rec = match rec {
            Ok(r) => r,
            Err(e) => {
                log(format!("cannot read a journal record: {}", wanmig_types::error_chain(&e)));
                continue;
            }
        };
        let Some(owner) = rec.owner.clone() else { continue };
        if owner.alive()
            || (rec.images.is_empty() && rec.phase != DestPhase::Receiving && rec.phase != DestPhase::Ready)
        {
            continue;
        }
        let why = format!("migration {} of VM {} (its receive, pid {}, is gone)", rec.migration_id, rec.vm, owner.pid);
        let committed = rec.phase == DestPhase::Committed;
        for img in &rec.images {
            for line in clean_image(img, committed) {
                log(format!("{line} of {why}"));
            }
        }
        rec.images.clear();
        let phase = if committed { DestPhase::Committed } else { DestPhase::Aborted };
        if let Err(e) = journal.record(&mut rec, phase) {
            log(format!("cannot journal the end of {why}: {}", wanmig_types::error_chain(&e)));
        }
    }
    clean_sockets(dir, log);
}

/// Cleans one image's files; returns what it did.
fn clean_image(img: &ImageRecord, committed: bool) -> Vec<String> {
    let mut done = Vec::new();
    // Its identity, and (unless it is a replica) still empty: an inode
    // number is reused once its file is gone, so identity alone could name
    // a file someone created since.
    let reserved = |p: &Path| {
        img.reservation.is_some()
            && FileId::at(p) == img.reservation
            && (img.replica || std::fs::symlink_metadata(p).is_ok_and(|m| m.len() == 0))
    };
    let mut remove = |p: &Path, what: &str| match std::fs::remove_file(p) {
        Ok(()) => done.push(format!("removed {what} {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => done.push(format!("cannot remove {what} {}: {e}", p.display())),
    };
    if committed {
        if reserved(&img.incoming) && !img.replica {
            remove(&img.incoming, "the reservation");
        } else if img.incoming.exists() && !reserved(&img.incoming) {
            done.push(format!("kept the committed image {}", img.incoming.display()));
        }
        return done;
    }
    // The incoming name holds this attempt's image (its name carries the
    // attempt), or, after an exchange cut short, its reservation.
    if !(img.replica && reserved(&img.incoming)) {
        remove(&img.incoming, "the incoming image");
    }
    if reserved(&img.path) && !img.replica {
        remove(&img.path, "the reservation");
    }
    done
}

/// Removes `wanmig-*.sock` files in `dir` nobody listens on (and the
/// temporary names a bind was cut short at).
fn clean_sockets(dir: &Path, log: &mut dyn FnMut(String)) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let socket = name.ends_with(".sock") || (name.contains(".sock.") && name.ends_with(".tmp"));
        if !name.starts_with("wanmig-") || !socket {
            continue;
        }
        let is_socket = e.file_type().is_ok_and(|t| {
            use std::os::unix::fs::FileTypeExt;
            t.is_socket()
        });
        // Nobody serves it: connecting is refused outright.
        let dead =
            matches!(UnixStream::connect(e.path()), Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused);
        if is_socket && dead && std::fs::remove_file(e.path()).is_ok() {
            log(format!("removed the stale control socket {}", e.path().display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{DestRecord, Owner};

    fn record(dir: &Path, owner: Owner, phase: DestPhase, images: Vec<ImageRecord>) -> DestRecord {
        let journal = DestJournal::new(dir);
        let mut rec = DestRecord {
            migration_id: wanmig_types::MigrationId::new(),
            vm: "vm".into(),
            source: "src".into(),
            phase,
            updated_unix: 0,
            sync: false,
            owner: Some(owner),
            images,
        };
        journal.record(&mut rec, phase).expect("journal");
        rec
    }

    #[test]
    fn a_dead_receives_images_and_reservations_go_a_live_ones_stay() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path();
        let me = Owner::this_process();
        let gone = Owner { start_ticks: me.start_ticks + 1, ..me.clone() };
        let image = |name: &str| {
            let (incoming, path) = (d.join(format!("{name}.aaaa.incoming")), d.join(name));
            std::fs::write(&incoming, b"data").expect("incoming");
            std::fs::write(&path, b"").expect("reservation");
            ImageRecord { incoming, reservation: FileId::at(&path), path, replica: false }
        };
        let stale = record(d, gone.clone(), DestPhase::Receiving, vec![image("a.img")]);
        let live = record(d, me, DestPhase::Receiving, vec![image("b.img")]);
        // A reservation that someone else's file has since replaced is not ours.
        let replaced = image("c.img");
        std::fs::remove_file(&replaced.path).expect("rm");
        std::fs::write(&replaced.path, b"theirs").expect("write");
        record(d, gone.clone(), DestPhase::Ready, vec![replaced]);
        // Committed: the image stays where it is.
        let kept = image("e.img");
        record(d, gone, DestPhase::Committed, vec![kept]);
        // A control socket nobody serves, and one served.
        let dead = d.join("wanmig-old.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind"));
        let served = d.join("wanmig-live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&served).expect("bind");

        let mut lines = Vec::new();
        clean(&DestJournal::new(d), d, &mut |l| lines.push(l));
        let all = lines.join("\n");
        assert!(!d.join("a.img.aaaa.incoming").exists() && !d.join("a.img").exists(), "{all}");
        assert!(d.join("b.img.aaaa.incoming").exists() && d.join("b.img").exists(), "a live receive's: {all}");
        assert!(!d.join("c.img.aaaa.incoming").exists(), "{all}");
        assert_eq!(std::fs::read(d.join("c.img")).expect("read"), b"theirs");
        assert!(d.join("e.img.aaaa.incoming").exists() && all.contains("kept the committed image"), "{all}");
        assert!(!dead.exists() && served.exists(), "{all}");
        assert!(all.contains("is gone"), "{all}");
        let j = DestJournal::new(d);
        let back = j.read(stale.migration_id).expect("read").expect("record");
        assert_eq!((back.phase, back.images.len()), (DestPhase::Aborted, 0));
        assert_eq!(j.read(live.migration_id).expect("read").expect("record").phase, DestPhase::Receiving);
        // Nothing more to do the second time.
        let mut again = Vec::new();
        clean(&j, d, &mut |l| again.push(l));
        assert!(again.is_empty(), "{again:?}");
    }
}
