//! Placeholder: scenarios land here.
