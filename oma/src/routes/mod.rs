//! One router per resource, merged by [`crate::app`].

pub mod contexts;
pub mod health;
pub mod jobs;
pub mod openapi;
pub mod recovery;
pub mod vmas;
pub mod watchdog;
