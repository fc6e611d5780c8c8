//! shard (placeholder).
