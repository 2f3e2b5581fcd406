//! The chat's keyboard: the line editor (rustyline: arrow keys, history, Ctrl-U, Ctrl-W,
//! Ctrl-L) on a thread of its own, since it blocks; it hands over each typed line. What the
//! lines mean is the chat loop's business, except `/quit`, Ctrl-C and Ctrl-D, which end it.

use rustyline::error::ReadlineError;
use rustyline::{Config, DefaultEditor, ExternalPrinter};
use tokio::sync::mpsc;

use crate::client::ClientError;
use crate::client::messenger::MessengerError;

/// How many typed lines the editor's history keeps (Up and Down recall them).
const HISTORY: usize = 500;

/// What the keyboard thread reports.
pub(super) enum Input {
    /// A typed line.
    Line(String),
    /// The user leaves (Ctrl-C, Ctrl-D, `/quit`).
    Quit,
    /// The terminal failed.
    Failed(String),
}

/// Starts the line editor on a thread of its own; returns what it reads and the printer that
/// writes above it.
pub(super) async fn spawn_keyboard(
    prompt: String,
) -> Result<(mpsc::Receiver<Input>, Box<dyn ExternalPrinter + Send>), MessengerError> {
    let (tx, keys) = mpsc::channel(16);
    let (printer_tx, printer_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let config = Config::builder()
            .max_history_size(HISTORY)
            .map(|b| b.auto_add_history(false).build());
        let editor = config
            .and_then(DefaultEditor::with_config)
            .and_then(|mut editor| {
                let printer = editor.create_external_printer()?;
                Ok((editor, printer))
            });
        match editor {
            Ok((editor, printer)) => {
                let printer: Box<dyn ExternalPrinter + Send> = Box::new(printer);
                if printer_tx.send(Ok(printer)).is_ok() {
                    read_lines(editor, &prompt, &tx);
                }
            }
            Err(e) => {
                let _ = printer_tx.send(Err(e));
            }
        }
    });
    let printer = printer_rx
        .await
        .map_err(|_| editor_error("the line editor did not start".into()))?
        .map_err(|e| editor_error(e.to_string()))?;
    Ok((keys, printer))
}

fn editor_error(reason: String) -> MessengerError {
    MessengerError::Client(ClientError::Io(std::io::Error::other(format!(
        "terminal: {reason}"
    ))))
}

/// The keyboard thread: one line at a time until the user leaves.
fn read_lines(mut editor: DefaultEditor, prompt: &str, tx: &mpsc::Sender<Input>) {
    loop {
        let input = match editor.readline(prompt) {
            Ok(line) if line.trim() == "/quit" => Input::Quit,
            Ok(line) => {
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                Input::Line(line)
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => Input::Quit,
            Err(e) => Input::Failed(e.to_string()),
        };
        let last = !matches!(input, Input::Line(_));
        if tx.blocking_send(input).is_err() || last {
            return;
        }
    }
}
