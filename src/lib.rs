//! lathe: a daemonless, rootless Cloud Native Buildpacks builder that reads and writes OCI
//! images on every transport (registry, OCI layout, oci-archive, docker-archive).
//!
//! Data flows one way: source → sandbox → layers → image → index → destination. This crate
//! is the library; `src/main.rs` is a thin command line over [`cli`].

pub mod archive;
pub mod assembly;
pub mod attachments;
pub mod build;
pub mod bundle;
pub mod cache;
pub mod cli;
pub mod content;
pub mod distribution;
pub mod elfcheck;
pub mod export;
pub mod idmap;
pub mod image;
pub mod index;
pub mod inspect;
pub mod launcher;
pub mod layer;
pub mod layout;
pub mod lifecycle;
pub mod platform;
pub mod progress;
pub mod project;
pub mod rebase;
pub mod reference;
pub mod registry;
pub mod run;
pub mod sandbox;
pub mod store;
pub mod unpack;
