//! Backups: content-defined, deduplicated archives in a chunk store, cron schedules and
//! Proxmox-style retention.

pub mod retention;
