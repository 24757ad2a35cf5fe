//! `headroom compare`: the same cases side by side across reports.
use clap::ValueEnum;

use crate::report::Report;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Md,
    Csv,
    Json,
}

pub fn render(reports: &[(String, Report)], _format: Format) -> String {
    format!("{} reports\n", reports.len())
}
