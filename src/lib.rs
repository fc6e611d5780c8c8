//! ringtftpd: a TFTP server for Linux on io_uring.
//!
//! Layers, from the inside out (see docs/design.md):
//! - [`proto`]: the wire format, pure and allocation-free on the DATA/ACK path;
//! - [`session`]: one transfer as a sans-IO state machine;
//! - [`endpoint`]: the per-shard demultiplexer and admission control, also sans-IO;
//! - [`policy`]: the settings a shard may swap while running, and the
//!   [`policy::Policy`] that decides each admitted request;
//! - [`timer`]: a hashed timing wheel;
//! - [`files`]: where files come from and uploads go: the confined root and
//!   its mapping cache, netascii, the upload writer, files in memory;
//! - [`shard`]: the io_uring driver, one per pinned core;
//! - [`remap`]: tftpd-hpa's filename remapping rules, pure;
//! - [`clients`]: the per-client policy file (CIDR, MAC, name rules), pure,
//!   and [`neigh`]: the kernel's neighbour table, for clients' MACs;
//! - [`server`] and [`config`]: the command line, start-up and signals;
//! - [`metrics`]: `--metrics`, the shards' published counters and their
//!   Prometheus endpoint, off the shards;
//! - [`top`]: `ringtftpd top`, the live view, and the shards' live
//!   transfers it reads.

pub mod clients;
pub mod config;
pub mod endpoint;
pub mod files;
pub mod hook;
pub mod log;
pub mod metrics;
pub mod neigh;
pub mod notify;
pub mod paths;
pub mod policy;
pub mod proto;
pub mod receive;
pub mod refusal;
pub mod remap;
pub mod server;
pub mod session;
pub mod shard;
pub mod timer;
pub mod top;
