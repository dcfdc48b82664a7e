//! Text tables for the `egret` commands (a module of the binary, not of the library):
//! columns as wide as their widest cell, numbers aligned right, no trailing blanks.

use std::io::{self, Write};

/// How a column's cells line up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table printed once every row is known, each column as wide as its widest cell.
pub struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn print(&self, out: &mut impl Write) -> io::Result<()> {
        let mut widths = self.header_widths();
        for row in &self.rows {
            grow(&mut widths, row);
        }
        let header = self.header();
        write_row(out, &self.columns, &widths, &header)?;
        for row in &self.rows {
            write_row(out, &self.columns, &widths, row)?;
        }
        Ok(())
    }

    /// Prints the header now and each row as it comes (a stream has no last row to
    /// measure): columns start at `minimums` wide and widen for longer cells, so rows
    /// stay aligned until a cell longer than any before.
    pub fn streaming(
        columns: &[(&'static str, Align)],
        minimums: &[usize],
        out: &mut impl Write,
    ) -> io::Result<StreamingTable> {
        let table = Self::new(columns);
        let mut widths = table.header_widths();
        for (width, minimum) in widths.iter_mut().zip(minimums) {
            *width = (*width).max(*minimum);
        }
        write_row(out, &table.columns, &widths, &table.header())?;
        Ok(StreamingTable {
            columns: table.columns,
            widths,
        })
    }

    fn header(&self) -> Vec<String> {
        self.columns
            .iter()
            .map(|(name, _)| (*name).to_owned())
            .collect()
    }

    fn header_widths(&self) -> Vec<usize> {
        self.columns
            .iter()
            .map(|(name, _)| name.chars().count())
            .collect()
    }
}

/// See [`Table::streaming`].
pub struct StreamingTable {
    columns: Vec<(&'static str, Align)>,
    widths: Vec<usize>,
}

impl StreamingTable {
    pub fn row(&mut self, out: &mut impl Write, cells: &[String]) -> io::Result<()> {
        grow(&mut self.widths, cells);
        write_row(out, &self.columns, &self.widths, cells)
    }
}

fn grow(widths: &mut [usize], cells: &[String]) {
    for (width, cell) in widths.iter_mut().zip(cells) {
        *width = (*width).max(cell.chars().count());
    }
}

fn write_row(
    out: &mut impl Write,
    columns: &[(&'static str, Align)],
    widths: &[usize],
    cells: &[String],
) -> io::Result<()> {
    let mut line = String::new();
    for (i, ((_, align), cell)) in columns.iter().zip(cells).enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        let pad = " ".repeat(widths[i].saturating_sub(cell.chars().count()));
        match align {
            Align::Right => {
                line.push_str(&pad);
                line.push_str(cell);
            }
            Align::Left => {
                line.push_str(cell);
                line.push_str(&pad);
            }
        }
    }
    writeln!(out, "{}", line.trim_end())
}

/// Aligned `label: value` lines, indented by two spaces, for one record's details.
pub fn print_details(out: &mut impl Write, details: &[(&str, String)]) -> io::Result<()> {
    let width = details
        .iter()
        .map(|(label, _)| label.chars().count() + 1)
        .max()
        .unwrap_or(0);
    for (label, value) in details {
        writeln!(out, "  {:<width$} {value}", format!("{label}:"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut table = Table::new(&[
            ("MAP", Align::Left),
            ("ENTRIES", Align::Right),
            ("NOTE", Align::Left),
        ]);
        table.row(vec!["POLICY_V2".into(), "7".into(), "a".into()]);
        table.row(vec![
            "CT_ESTABLISHED_V1".into(),
            "123456789".into(),
            String::new(),
        ]);
        let mut out = Vec::new();
        table.print(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "MAP                  ENTRIES  NOTE\n\
             POLICY_V2                  7  a\n\
             CT_ESTABLISHED_V1  123456789\n"
        );
    }

    #[test]
    fn a_streaming_table_widens_for_longer_cells() {
        let mut out = Vec::new();
        let columns = [("A", Align::Left), ("B", Align::Left)];
        let mut table = Table::streaming(&columns, &[3, 1], &mut out).unwrap();
        table.row(&mut out, &["x".into(), "y".into()]).unwrap();
        table.row(&mut out, &["wider".into(), "z".into()]).unwrap();
        table.row(&mut out, &["x".into(), "y".into()]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A    B\nx    y\nwider  z\nx      y\n"
        );
    }

    #[test]
    fn details_line_up_after_their_labels() {
        let mut out = Vec::new();
        print_details(
            &mut out,
            &[
                ("decided by", "rule".into()),
                ("passed over", "a, b".into()),
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "  decided by:  rule\n  passed over: a, b\n"
        );
    }
}
