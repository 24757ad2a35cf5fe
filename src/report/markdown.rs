//! The Markdown summary beside the JSON.
use crate::report::Report;
pub fn render(report: &Report) -> String {
    format!("# headroom report: {}\n", report.device.name)
}
