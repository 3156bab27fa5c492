//! `strata pool …`

use std::path::Path;
use std::process::ExitCode;

use crate::engine::FORMAT_VERSION;
use crate::engine::check::check_pool;

pub(super) fn check(dir: &Path, repair: bool) -> ExitCode {
    let report = match check_pool(dir, repair) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "strata: cannot check {}: {}",
                dir.display(),
                crate::engine::error::chain(&e)
            );
            return ExitCode::from(2);
        }
    };
    println!("Pool {} (format {FORMAT_VERSION})", dir.display());
    println!(
        "  {} volumes, {} snapshots, {} layers, {} presence chunks",
        report.volumes, report.snapshots, report.layers, report.presence_chunks
    );
    for note in &report.notes {
        println!("  note: {note}");
    }
    for done in &report.repaired {
        println!("  repaired: {done}");
    }
    for f in &report.findings {
        let tag = if f.repairable { "orphan" } else { "PROBLEM" };
        println!("  {tag}: {}", f.message);
    }
    if report.is_clean() {
        println!("OK: the pool is consistent.");
        return ExitCode::SUCCESS;
    }
    let orphans = report.findings.iter().filter(|f| f.repairable).count();
    let damage = report.findings.len() - orphans;
    println!("{damage} problem(s), {orphans} orphan(s).");
    if orphans > 0 && !repair {
        println!(
            "Run `strata pool check --repair {}` to remove the orphans.",
            dir.display()
        );
    }
    if damage > 0 {
        println!("Damage is never repaired automatically; keep the pool as it is and report it.");
    }
    ExitCode::from(1)
}
