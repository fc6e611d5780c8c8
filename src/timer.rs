//! Hashed timing wheel (placeholder).
