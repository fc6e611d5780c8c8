//! server (placeholder).
