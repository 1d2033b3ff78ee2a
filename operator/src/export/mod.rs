//! Evidence export: FileChanges in the formats SIEMs read.

pub mod format;
