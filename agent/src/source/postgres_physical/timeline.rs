//! Timeline history files: which timeline holds a WAL position.
//!
//! A promotion starts a new timeline; its history file (`0000000N.history`) lists every earlier
//! timeline with the position where it ended, one per line: `<tli>\t<switch LSN>\t<reason>`.
//! A position before a timeline's switch point belongs to that timeline (or an earlier one); at
//! or after the last switch point, to the newest. The streamer asks the server for WAL on the
//! timeline that holds where the archive ends, and the server walks it through each switch;
//! restore reads the same files to follow the history to a target.

use super::Lsn;

/// One ended timeline: WAL before `end` (and after the previous entry's) is on `timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// The ended timeline.
    pub timeline: u32,
    /// Where it ended: the next timeline begins here.
    pub end: Lsn,
}

/// A history file's entries, oldest first. Blank lines and `#` comments are skipped; a line that
/// does not parse is an error naming it (a damaged history must never send replay astray).
pub fn parse(text: &str) -> Result<Vec<Ended>, String> {
    let mut out: Vec<Ended> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(tli), Some(end)) = (fields.next(), fields.next()) else {
            return Err(format!(
                "a timeline history line without a switch point: `{line}`"
            ));
        };
        let timeline: u32 = tli
            .parse()
            .map_err(|_| format!("a timeline history line with no timeline: `{line}`"))?;
        let end: Lsn = end.parse()?;
        if out
            .last()
            .is_some_and(|p| p.timeline >= timeline || p.end > end)
        {
            return Err(format!("timeline history out of order at `{line}`"));
        }
        out.push(Ended { timeline, end });
    }
    Ok(out)
}

/// The timeline that holds `lsn`, in a history whose newest timeline is `current`.
pub fn timeline_of(history: &[Ended], lsn: Lsn, current: u32) -> u32 {
    history
        .iter()
        .find(|e| lsn < e.end)
        .map(|e| e.timeline)
        .unwrap_or(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTORY: &str = "1\t0/3000158\tno recovery target specified\n\n\
                           2\t0/5A00000\tbefore 2026-12-02 03:00:00+00\n";

    #[test]
    fn positions_belong_to_the_timeline_that_held_them() {
        let h = parse(HISTORY).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(timeline_of(&h, "0/1000000".parse().unwrap(), 3), 1);
        assert_eq!(timeline_of(&h, "0/3000157".parse().unwrap(), 3), 1);
        assert_eq!(timeline_of(&h, "0/3000158".parse().unwrap(), 3), 2);
        assert_eq!(timeline_of(&h, "0/5A00000".parse().unwrap(), 3), 3);
        assert_eq!(timeline_of(&[], "9/0".parse().unwrap(), 1), 1);
    }

    #[test]
    fn damaged_histories_are_refused() {
        assert!(parse("1\n").is_err());
        assert!(parse("x\t0/1\treason\n").is_err());
        assert!(parse("1\tnowhere\treason\n").is_err());
        assert!(parse("2\t0/5\ta\n1\t0/6\tb\n").is_err(), "timelines go up");
        assert!(parse("# a comment\n").unwrap().is_empty());
    }
}
