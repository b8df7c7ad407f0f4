//! A user-space WAN link emulator for tests and benchmarks (netem is not
//! available on this project's machines).
//!
//! [`LinkEmulator`] stands in for a routed WAN link between two network
//! namespaces: it opens a TAP device in each and forwards every Ethernet
//! frame between them through a model of a link ([`model`]):
//!
//! - a **rate** in bits/s behind a **drop-tail queue** of a stated size in
//!   bytes, as a router's;
//! - a one-way **delay** with bounded, seeded **jitter** that keeps packet
//!   order (jitter bunches frames, it never reorders them);
//! - seeded, reproducible Bernoulli **loss**;
//! - each the same or different per direction ([`LinkConfig`]);
//! - **outages**, both directions at once, while which frames are dropped
//!   (a cut fibre), never queued: scripted ([`OutageSchedule`], relative to
//!   the start) or live from a [`LinkControl`] handle
//!   ([`LinkControl::set_down`], [`LinkControl::outage_for`]), which also
//!   changes the parameters at runtime, so a test can cut the link at a
//!   precise protocol moment;
//! - **counters** per direction: frames and bytes forwarded, lost,
//!   overflowed and dropped while down, and the achieved rate
//!   ([`Counters`]), plus the frames the kernel dropped because the
//!   emulator fell behind ([`LinkEmulator::kernel_drops`]).
//!
//! [`WanPair`] builds the usual topology (two namespaces, a TAP in each,
//! addresses on a /30, up) and removes it all on drop, a panic included;
//! [`Netns`] and [`NsRuntime`] run threads and tokio runtimes inside a
//! namespace. Everything needs root (namespaces and TAP devices).
//!
//! ```no_run
//! use std::time::Duration;
//! use wanmig_linkem::{LinkConfig, LinkParams, WanPair};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // 1 Gbit/s, 50 ms RTT, 0.1% loss each way, one BDP of queue.
//! let params = LinkParams::wan(1_000_000_000, Duration::from_millis(50)).with_loss(0.001);
//! let pair = WanPair::new("demo", LinkConfig::symmetric(params))?;
//! let rt = pair.b().runtime(1)?; // sockets opened on it live in B
//! // … a server in B on pair.addr_b(), a client in A …
//! pair.control().outage_for(Duration::from_secs(5)); // cut the fibre for 5 s
//! # drop(rt);
//! # Ok(())
//! # }
//! ```
//!
//! # How it runs, and how fast
//!
//! One thread per direction reads frames from one TAP, asks the model what
//! becomes of each, holds the delivered ones in a delay line and writes each
//! to the other TAP at its instant, waking with `ppoll`'s nanosecond timeout
//! (not tokio's 1 ms timers); see [`emulator`]. Rates count whole Ethernet
//! frames as the TAP hands them over (no preamble, FCS or gap), so TCP's
//! goodput over a link of rate R is at most 1448/1514 ≈ 95.6% of R (1500
//! MTU, timestamps on).
//!
//! Measured on this project's development machine (2 vCPUs shared with
//! other work, load average about 2; Linux 6.18; release build) with
//! `cargo bench -p wanmig-linkem --bench tcp`: per row a fresh [`WanPair`]
//! with [`LinkParams::wan`] (half the RTT each way, a queue of one
//! bandwidth-delay product, at least 1 MiB), then a UDP flood offered at
//! 120% of the rate for 3 s (pacing alone: frame bits delivered over the
//! last 1.5 s), then one TCP Cubic flow for 10 s ("steady" leaves out the
//! first 2 s). CPU is the whole process (sender, receiver, emulator and
//! the kernel's TCP work in their system calls), 100% being one core.
//!
//! | rate | RTT | idle RTT (UDP) | UDP flood delivered | TCP steady | TCP, whole 10 s | CPU |
//! |---|---|---|---|---|---|---|
//! | 100 Mbit/s | 0 ms | 0.21 ms | 100.0% | 95.6% | 94.7% | 45% |
//! | 200 Mbit/s | 0 ms | 0.17 ms | 99.7% | 95.6% | 95.2% | 52% |
//! | 1 Gbit/s | 0 ms | 0.07 ms | 99.8% | 94.6% | 94.7% | 75% |
//! | 100 Mbit/s | 50 ms | 50.34 ms | 100.0% | 95.6% | 92.0% | 41% |
//! | 200 Mbit/s | 50 ms | 50.31 ms | 100.0% | 95.6% | 91.7% | 46% |
//! | 1 Gbit/s | 50 ms | 50.29 ms | 100.0% | 95.5% | 90.6% | 85% |
//!
//! So pacing holds the configured rate to within 0.3%, one TCP flow
//! reaches its 95.6% ceiling once past slow start, and the emulator adds
//! 0.05–0.35 ms to a round trip. Without a rate limit it forwards one TCP
//! flow at 4.8 Gbit/s (`-- 0:0`). The limit is CPU time: the TAP's
//! transmit ring ([`emulator::TAP_QUEUE_FRAMES`]) overflows when the
//! emulator's threads do not run for a few milliseconds; it did in two of
//! the runs at 1 Gbit/s and 50 ms (129 frames in 6 s with the load average
//! at 5; 1569 in 15 s of a BBR flow with 0.1% loss) and at 4.8 Gbit/s
//! (292 in 10 s). The bench prints those
//! drops ([`LinkEmulator::kernel_drops`]); a figure taken with some is not
//! the link's alone. Random loss is the model's own: Linux's Cubic through
//! 1 Gbit/s, 50 ms and 0.1% (1%) loss gets 10 (3) Mbit/s, as the
//! loss-based throughput formula says (`-- 1000:50:0:0.1`).
//!
//! It is test infrastructure: no part of a migration runs through it.

pub mod emulator;
pub mod model;
pub mod netns;
pub mod topology;

pub use emulator::{Counters, Direction, EmulatorError, LinkConfig, LinkControl, LinkEmulator};
pub use model::{DirectionModel, LinkParams, Outage, OutageSchedule, ParamsError, Verdict};
pub use netns::{Netns, NetnsError, NsRuntime, enter_netns, in_netns};
pub use topology::{TopologyError, WanPair};
