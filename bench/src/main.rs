//! `linkem-run`: the WAN link emulator of `wanmig-linkem` as a program, so
//! that a script can put an emulated link between two network namespaces
//! and read its counters (`scripts/compare-qemu.sh` runs wanmig and QEMU
//! over it and counts every byte either puts on the link the same way).
//!
//! ```text
//! linkem-run --ns-a NS --tap-a TAP --ns-b NS --tap-b TAP \
//!            --rate-mbit R --rtt-ms T [--loss-pct P] [--seed S]
//! ```
//!
//! It creates TAP device `TAP-A` in namespace `NS-A` and `TAP-B` in `NS-B`
//! (both namespaces must exist; the caller gives the devices addresses and
//! brings them up) and forwards frames between them: `R` Mbit/s each way
//! behind a drop-tail queue of one bandwidth-delay product (at least
//! 1 MiB), half of `T` ms of delay each way, `P` percent of random loss
//! each way ([`LinkParams::wan`]). It prints `ready` on stdout once both
//! devices exist, then answers each line on stdin with one JSON line of
//! counters (the line `quit`, or the end of stdin, prints them a last time
//! and stops; the devices go with it). Counters per direction (`a_to_b`,
//! `b_to_a`): frames and bytes forwarded, lost at random, dropped by the
//! full queue; and `kernel_drops`, frames the kernel dropped because the
//! emulator fell behind (non-zero means the link dropped more than its
//! parameters say). Bytes are whole Ethernet frames as the TAP hands them
//! over. Needs root.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use wanmig_linkem::{Counters, Direction, LinkConfig, LinkEmulator, LinkParams};

/// The command line, parsed.
#[derive(Debug)]
struct Args {
    ns_a: String,
    tap_a: String,
    ns_b: String,
    tap_b: String,
    rate_mbit: f64,
    rtt_ms: f64,
    loss_pct: f64,
    seed: u64,
}

const USAGE: &str = "usage: linkem-run --ns-a NS --tap-a TAP --ns-b NS --tap-b TAP \
                     --rate-mbit R --rtt-ms T [--loss-pct P] [--seed S]";

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut ns_a, mut tap_a, mut ns_b, mut tap_b) = (None, None, None, None);
    let (mut rate, mut rtt, mut loss, mut seed) = (None, None, 0.0, 1);
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("{flag}: `{v}` is not a number"));
        match flag.as_str() {
            "--ns-a" => ns_a = Some(value),
            "--tap-a" => tap_a = Some(value),
            "--ns-b" => ns_b = Some(value),
            "--tap-b" => tap_b = Some(value),
            "--rate-mbit" => rate = Some(num(&value)?),
            "--rtt-ms" => rtt = Some(num(&value)?),
            "--loss-pct" => loss = num(&value)?,
            "--seed" => seed = value.parse().map_err(|_| format!("--seed: `{value}` is not an integer"))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    let need = |v: Option<String>, name: &str| v.ok_or_else(|| format!("{name} is required"));
    let args = Args {
        ns_a: need(ns_a, "--ns-a")?,
        tap_a: need(tap_a, "--tap-a")?,
        ns_b: need(ns_b, "--ns-b")?,
        tap_b: need(tap_b, "--tap-b")?,
        rate_mbit: rate.ok_or("--rate-mbit is required")?,
        rtt_ms: rtt.ok_or("--rtt-ms is required")?,
        loss_pct: loss,
        seed,
    };
    if !(args.rate_mbit > 0.0 && args.rate_mbit <= 1e5) {
        return Err(format!("--rate-mbit {} is out of range (0, 100000]", args.rate_mbit));
    }
    if !(0.0..=10_000.0).contains(&args.rtt_ms) {
        return Err(format!("--rtt-ms {} is out of range [0, 10000]", args.rtt_ms));
    }
    if !(0.0..=100.0).contains(&args.loss_pct) {
        return Err(format!("--loss-pct {} is out of range [0, 100]", args.loss_pct));
    }
    Ok(args)
}

fn direction_json(c: &Counters) -> String {
    format!(
        "{{\"forwarded\":{},\"forwarded_bytes\":{},\"lost\":{},\"lost_bytes\":{},\"overflowed\":{},\
         \"overflowed_bytes\":{},\"write_errors\":{}}}",
        c.forwarded, c.forwarded_bytes, c.lost, c.lost_bytes, c.overflowed, c.overflowed_bytes, c.write_errors
    )
}

/// One JSON line: the time since the emulator started and both directions'
/// counters.
fn counters_json(link: &LinkEmulator) -> String {
    let control = link.control();
    let [a, b] = link.counters();
    let drops = match link.kernel_drops() {
        Ok([x, y]) => format!("[{x},{y}]"),
        Err(_) => "null".into(),
    };
    let failure = control.failure().map_or_else(|| "null".into(), |f| format!("{f:?}"));
    format!(
        "{{\"t\":{:.6},\"a_to_b\":{},\"b_to_a\":{},\"kernel_drops\":{drops},\"failure\":{failure}}}",
        control.elapsed().as_secs_f64(),
        direction_json(&a),
        direction_json(&b)
    )
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("linkem-run: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let params = LinkParams::wan((args.rate_mbit * 1e6) as u64, Duration::from_secs_f64(args.rtt_ms / 1e3))
        .with_loss(args.loss_pct / 100.0);
    let config = LinkConfig::symmetric(params).with_seed(args.seed);
    let link = match LinkEmulator::start(&args.ns_a, &args.tap_a, &args.ns_b, &args.tap_b, config) {
        Ok(l) => l,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("linkem-run: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "ready").and_then(|()| out.flush()).is_err() {
        return ExitCode::FAILURE;
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() == "quit" {
            break;
        }
        if writeln!(out, "{}", counters_json(&link)).and_then(|()| out.flush()).is_err() {
            return ExitCode::FAILURE;
        }
    }
    let _ = writeln!(out, "{}", counters_json(&link));
    let _ = out.flush();
    for d in Direction::BOTH {
        let c = link.control().counters(d);
        eprintln!(
            "linkem-run: {d}: {} frames, {} bytes forwarded; {} lost, {} overflowed",
            c.forwarded, c.forwarded_bytes, c.lost, c.overflowed
        );
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn the_command_line_is_checked() {
        let a = args("--ns-a x --tap-a wan --ns-b y --tap-b wan --rate-mbit 200 --rtt-ms 50 --loss-pct 0.1")
            .expect("valid");
        assert_eq!((a.rate_mbit, a.rtt_ms, a.loss_pct, a.seed), (200.0, 50.0, 0.1, 1));
        assert!(args("--ns-a x --tap-a wan --ns-b y --tap-b wan --rtt-ms 50").is_err(), "no rate");
        assert!(args("--ns-a x --tap-a wan --ns-b y --tap-b wan --rate-mbit 0 --rtt-ms 1").is_err());
        assert!(args("--ns-a x --tap-a wan --ns-b y --tap-b wan --rate-mbit 1 --rtt-ms 1 --loss-pct 101").is_err());
        assert!(args("--ns-a x --tap-a wan --ns-b y --tap-b wan --rate-mbit 1 --rtt-ms 1 --bogus 1").is_err());
        assert!(args("--ns-a").is_err(), "a flag without its value");
    }
}
