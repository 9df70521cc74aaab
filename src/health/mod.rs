//! Health checking (being written).
