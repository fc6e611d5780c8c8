//! files (placeholder).
