//! Integration tests: the built-in test guest under real KVM, in real
//! `wanmig` processes. Each test fails (never skips) without /dev/kvm.

mod bad_input;
mod control;
mod dirty_tracking;
mod disk_migration;
mod dr;
mod hardening;
mod harness;
mod layering;
mod linux;
mod migration;
mod network;
mod power;
mod qemu;
mod realism;
mod snapshot_restore;
mod tunnel;
mod wan;
