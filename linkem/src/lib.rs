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
//! It is test infrastructure: no part of a migration runs through it.

pub mod emulator;
pub mod model;
pub mod netns;
pub mod topology;

pub use emulator::{Counters, Direction, EmulatorError, LinkConfig, LinkControl, LinkEmulator};
pub use model::{DirectionModel, LinkParams, Outage, OutageSchedule, ParamsError, Verdict};
pub use netns::{Netns, NetnsError, NsRuntime, enter_netns, in_netns};
pub use topology::{TopologyError, WanPair};
