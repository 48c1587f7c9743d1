//! Placeholder; filled in by the hostile-layer corpus work.
