//! `wanmig settle`, and the check that keeps `run` and `restore` from
//! starting a second copy of a VM that may run elsewhere.

use std::process::ExitCode;

use anyhow::{Result, bail};
use wanmig_control::settle::{self, Verdict};
use wanmig_control::{self as control, Request};
use wanmig_migrate::journal::{SourceJournal, SourcePhase};
use wanmig_vmm::VmConfig;

/// Refuses to start `cfg`'s VM while its journal says it migrated away or
/// is in doubt, unless `force`. A journal left by a migration that never
/// sent its commit (the process died before) is cleared: the VM is here.
pub fn check_may_run(cfg: &VmConfig, force: bool) -> Result<()> {
    let journal = SourceJournal::new(&cfg.state_dir, &cfg.name);
    let Some(rec) = journal.read()? else { return Ok(()) };
    let why = match rec.phase {
        SourcePhase::Started => return Ok(journal.clear()?),
        SourcePhase::CommitSent => format!(
            "migration {} of VM '{}' to {} is in doubt (its commit was sent, no acknowledgement came): \
             the VM may be running there; run `wanmig settle` on this vm.toml first",
            rec.migration_id, cfg.name, rec.dest
        ),
        SourcePhase::Migrated => {
            format!("VM '{}' migrated to {} (migration {}) and runs there", cfg.name, rec.dest, rec.migration_id)
        }
    };
    if force {
        eprintln!("wanmig: WARNING: {why}; starting it here anyway (--force)");
        return Ok(journal.clear()?);
    }
    bail!("{why}; (--force starts it anyway: two copies of one VM corrupt its disks and its network)")
}

/// `wanmig settle`: through the process that serves the VM if there is one,
/// else straight from the journal.
pub fn settle(cfg: &VmConfig, force_resume: bool) -> Result<ExitCode> {
    match control::request(&cfg.control_socket, &Request::Settle { force_resume }) {
        Ok(r) => {
            let report = r.settled.map(|s| s.action).unwrap_or_default();
            println!("settled: {report}");
            return Ok(ExitCode::SUCCESS);
        }
        Err(control::ControlError::Connect { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    // No process serves the VM: it died (or was killed) mid-migration.
    let journal = SourceJournal::new(&cfg.state_dir, &cfg.name);
    let Some(mut rec) = journal.read()? else {
        println!("nothing to settle: the journal records no migration of VM '{}'", cfg.name);
        return Ok(ExitCode::SUCCESS);
    };
    if rec.phase == SourcePhase::Migrated {
        println!("settled already: VM '{}' runs at {} (migration {})", cfg.name, rec.dest, rec.migration_id);
        return Ok(ExitCode::SUCCESS);
    }
    let said = settle::ask_destination(&rec).map_err(crate::chain)?;
    let (verdict, action) = settle::apply(&journal, &mut rec, said, force_resume)?;
    match verdict {
        Verdict::Retire => println!("settled: {action}"),
        Verdict::Reclaim => println!(
            "settled: {action}; no process runs it here any more (its memory went with the process): \
             start it from its disks with `wanmig run`"
        ),
        Verdict::Undecided => bail!("{action}"),
    }
    Ok(ExitCode::SUCCESS)
}
