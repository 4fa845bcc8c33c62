//! Progress bars on a terminal: the CLI's [`Progress`] and [`Reporter`], drawn with
//! indicatif on stderr. Off a terminal nothing is drawn.

use std::io::IsTerminal;
use std::sync::{Arc, OnceLock};

use indicatif::{ProgressBar, ProgressStyle};
use stead_host::progress::{Meter, NoProgress, Progress, Reporter};

/// Draws progress on stderr when it is a terminal.
#[derive(Debug, Default, Clone, Copy)]
pub struct Terminal;

impl Reporter for Terminal {
    fn start(&self, label: &str, meter: Meter) -> Arc<dyn Progress> {
        bar(label, meter)
    }
}

/// A bar for `label` on a terminal, else a [`NoProgress`].
pub fn bar(label: &str, meter: Meter) -> Arc<dyn Progress> {
    if !std::io::stderr().is_terminal() {
        return Arc::new(NoProgress);
    }
    Arc::new(Bar {
        label: label.to_string(),
        meter,
        bar: OnceLock::new(),
    })
}

/// An indicatif bar made on first use, so a progress that is never advanced draws nothing.
struct Bar {
    label: String,
    meter: Meter,
    bar: OnceLock<ProgressBar>,
}

impl Bar {
    /// The bar, made with length `len` if it does not exist yet.
    fn get_with(&self, len: u64) -> &ProgressBar {
        self.bar.get_or_init(|| {
            let pb = ProgressBar::new(len);
            let (template, chars) = match self.meter {
                Meter::Transfer => (
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    Some("=> "),
                ),
                Meter::Unpack => ("{msg} [{bar:30}] {bytes}/{total_bytes} {eta}", None),
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                pb.set_style(match chars {
                    Some(c) => style.progress_chars(c),
                    None => style,
                });
            }
            pb.set_message(self.label.clone());
            pb
        })
    }
}

impl Progress for Bar {
    fn set_length(&self, len: u64) {
        self.get_with(len).set_length(len);
    }

    fn inc(&self, delta: u64) {
        self.get_with(0).inc(delta);
    }

    fn set_position(&self, pos: u64) {
        self.get_with(0).set_position(pos);
    }

    fn set_message(&self, msg: &str) {
        self.get_with(0).set_message(msg.to_string());
    }

    fn finish(&self) {
        if let Some(pb) = self.bar.get() {
            pb.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unused_bar() -> Bar {
        Bar {
            label: "copy".into(),
            meter: Meter::Transfer,
            bar: OnceLock::new(),
        }
    }

    #[test]
    fn a_bar_is_made_on_first_use_only() {
        let b = unused_bar();
        b.finish();
        assert!(
            b.bar.get().is_none(),
            "finishing an unused progress draws nothing"
        );
        b.set_length(10);
        b.inc(4);
        let pb = b.bar.get().expect("made by set_length");
        assert_eq!((pb.length(), pb.position()), (Some(10), 4));
        assert_eq!(pb.message(), "copy");
        b.finish();
        assert!(pb.is_finished());
    }
}
