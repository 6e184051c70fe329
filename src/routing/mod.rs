//! Mixture-of-Depths routing, independent of the model it routes.
//!
//! - [`gate`]: the router of one layer, `g = sigmoid(w · x + b)`.
//! - [`selection`]: which tokens pass: threshold-p (MoDification) or top-k (MoD).
//! - [`dispatch`]: gathering the kept tokens into a dense block and adding their update back.
//! - [`stats`]: what a routed layer did (kept fraction F_j, mean gate G_j, FLOPs).
//! - [`map`]: which tokens each routed layer kept, as text or an HTML heat map.

pub mod dispatch;
pub mod gate;
pub mod map;
pub mod selection;
pub mod stats;

pub use dispatch::Dispatch;
pub use gate::Router;
pub use map::RoutingMap;
pub use selection::Selection;
pub use stats::RoutingStats;
