//! `sfc chat USER`: an interactive terminal chat. The screen scrolls the conversation; the
//! bottom line is where you type. Incoming messages are printed above the typing line as they
//! arrive, without disturbing what you are typing. Enter sends, Ctrl-C or Ctrl-D (or `/quit`)
//! leaves.

use std::io::{Write, stdout};
use std::sync::Arc;
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use crossterm::terminal::{self, Clear, ClearType};
use crossterm::{cursor, queue};
use tokio::sync::mpsc;

use super::messenger::{Messenger, MessengerError, Received};

/// How often the chat tries again what waits in the outbox.
const OUTBOX_RETRY: Duration = Duration::from_secs(5);

/// What the keyboard thread reports.
enum Input {
    Line(String),
    Edit(String),
    Quit,
}

/// Restores the terminal when the chat ends, however it ends.
struct RawMode;

impl RawMode {
    fn enter() -> std::io::Result<Self> {
        terminal::enable_raw_mode()?;
        Ok(Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = terminal::disable_raw_mode();
        println!();
    }
}

fn redraw(prompt: &str, typed: &str) {
    let mut out = stdout();
    let _ = queue!(out, cursor::MoveToColumn(0), Clear(ClearType::CurrentLine));
    let _ = write!(out, "{prompt}{typed}");
    let _ = out.flush();
}

fn print_above(prompt: &str, typed: &str, line: &str) {
    let mut out = stdout();
    let _ = queue!(out, cursor::MoveToColumn(0), Clear(ClearType::CurrentLine));
    // Raw mode: a newline does not return the carriage by itself.
    let _ = write!(out, "{}\r\n", line.replace('\n', "\r\n"));
    let _ = out.flush();
    redraw(prompt, typed);
}

fn read_keys(tx: mpsc::Sender<Input>) {
    let mut typed = String::new();
    loop {
        let Ok(event) = event::read() else {
            let _ = tx.blocking_send(Input::Quit);
            return;
        };
        let Event::Key(KeyEvent {
            code,
            modifiers,
            kind: KeyEventKind::Press,
            ..
        }) = event
        else {
            continue;
        };
        let ctrl = modifiers.contains(KeyModifiers::CONTROL);
        let input = match code {
            KeyCode::Char('c' | 'd') if ctrl => Input::Quit,
            KeyCode::Enter => Input::Line(std::mem::take(&mut typed)),
            KeyCode::Backspace => {
                typed.pop();
                Input::Edit(typed.clone())
            }
            KeyCode::Char(c) if !ctrl => {
                typed.push(c);
                Input::Edit(typed.clone())
            }
            _ => continue,
        };
        let quit = matches!(input, Input::Quit);
        if tx.blocking_send(input).is_err() || quit {
            return;
        }
    }
}

/// Runs the chat with `peer` until the user leaves.
pub async fn run(messenger: Arc<Messenger>, me: &str, peer: &str) -> Result<(), MessengerError> {
    let prompt = format!("{me}> ");
    println!("chatting with {peer} (Enter sends, Ctrl-C leaves)");
    let _raw = RawMode::enter().map_err(|e| MessengerError::Client(super::ClientError::Io(e)))?;
    let (tx, mut keys) = mpsc::channel(64);
    std::thread::spawn(move || read_keys(tx));
    // Receiving runs in its own task so that a keystroke never interrupts a message between
    // its arrival and its acknowledgement.
    let (incoming_tx, mut incoming) = mpsc::channel(64);
    let receiver = {
        let messenger = Arc::clone(&messenger);
        tokio::spawn(async move {
            loop {
                let received = messenger.receive(Duration::from_secs(1)).await;
                let failed = received.is_err();
                if incoming_tx.send(received).await.is_err() || failed {
                    return;
                }
            }
        })
    };
    let result = chat_loop(&messenger, &prompt, me, peer, &mut keys, &mut incoming).await;
    receiver.abort();
    result
}

/// Sends what waits in the outbox and tells the user what left it (and, with `tell_waiting`,
/// what still waits and why). Returns whether anything still waits.
async fn flush_outbox(
    messenger: &Messenger,
    prompt: &str,
    typed: &str,
    tell_waiting: bool,
) -> bool {
    match messenger.flush_outbox().await {
        Ok(flushed) => {
            for (to, id) in &flushed.sent {
                print_above(
                    prompt,
                    typed,
                    &format!("-- sent {id} to {to} from the outbox"),
                );
            }
            for (to, id, why) in &flushed.dropped {
                let line = format!("!! the server refused {id} to {to} for good: {why}");
                print_above(prompt, typed, &line);
            }
            if tell_waiting && let Some(why) = &flushed.stopped {
                let line = format!(
                    "!! {} messages still wait in the outbox: {why}",
                    flushed.waiting
                );
                print_above(prompt, typed, &line);
            }
            flushed.waiting > 0
        }
        Err(e) => {
            print_above(prompt, typed, &format!("!! outbox: {e}"));
            true
        }
    }
}

async fn chat_loop(
    messenger: &Messenger,
    prompt: &str,
    me: &str,
    peer: &str,
    keys: &mut mpsc::Receiver<Input>,
    incoming: &mut mpsc::Receiver<Result<Option<Received>, MessengerError>>,
) -> Result<(), MessengerError> {
    let prompt = prompt.to_owned();
    let mut typed = String::new();
    redraw(&prompt, &typed);
    // What waited in the outbox goes first, and whatever still waits is tried again every
    // OUTBOX_RETRY (a full inbox empties as its owner reads).
    let mut waiting = flush_outbox(messenger, &prompt, &typed, true).await;
    let mut retry =
        tokio::time::interval_at(tokio::time::Instant::now() + OUTBOX_RETRY, OUTBOX_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = retry.tick(), if waiting => {
                waiting = flush_outbox(messenger, &prompt, &typed, false).await;
            }
            input = keys.recv() => match input {
                None | Some(Input::Quit) => return Ok(()),
                Some(Input::Edit(now)) => {
                    typed = now;
                    redraw(&prompt, &typed);
                }
                Some(Input::Line(line)) => {
                    typed.clear();
                    let line = line.trim().to_owned();
                    if line == "/quit" {
                        return Ok(());
                    }
                    if line.is_empty() {
                        redraw(&prompt, &typed);
                        continue;
                    }
                    // Whatever happens to it, the next tick looks at the outbox.
                    waiting = true;
                    match messenger.send_text(peer, &line).await {
                        Ok((_, warning)) => {
                            if let Some(warning) = warning {
                                print_above(&prompt, &typed, &format!("!! {warning}"));
                            }
                            print_above(&prompt, &typed, &format!("{me}: {line}"));
                        }
                        Err(MessengerError::Queued { reason, .. }) => {
                            print_above(&prompt, &typed, &format!("{me}: {line}"));
                            let every = OUTBOX_RETRY.as_secs();
                            let note = format!(
                                "!! not sent yet ({reason}): it waits in the outbox, tried again every {every} s"
                            );
                            print_above(&prompt, &typed, &note);
                        }
                        Err(e) => print_above(&prompt, &typed, &format!("!! not sent: {e}")),
                    }
                }
            },
            received = incoming.recv() => match received.unwrap_or(Ok(None)) {
                Ok(Some(received)) => {
                    match &received {
                        Received::Text { from, text, warning, .. } => {
                            if let Some(warning) = warning {
                                print_above(&prompt, &typed, &format!("!! {warning}"));
                            }
                            print_above(&prompt, &typed, &format!("{from}: {text}"));
                        }
                        Received::Undecryptable { from, reason, .. } => {
                            let line = format!("!! a message from {from} could not be opened ({reason}); it is kept in `sfc quarantine` and {from} was asked to send it again");
                            print_above(&prompt, &typed, &line);
                        }
                        Received::RetryRequested { from, id, resent_as: Some(new) } => {
                            print_above(&prompt, &typed, &format!("-- {from} could not open {id}: sent again as {new}"));
                        }
                        Received::RetryRequested { .. } | Received::Duplicate => {}
                    }
                    // Shown: only now may it leave the keystore and the server.
                    messenger.shown(&received).await?;
                }
                Ok(None) => {}
                Err(e) => {
                    print_above(&prompt, &typed, &format!("!! connection problem: {e}"));
                    return Err(e);
                }
            },
        }
    }
}
