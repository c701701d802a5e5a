//! The Redis store (placeholder).
