//! `sfc`: the SecureFastChat command-line client. Parses arguments and calls the client library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use securefastchat::client::home::{Home, SavedSession};
use securefastchat::client::{Client, ClientError, ClientOptions};
use securefastchat::protocol::{ErrorCode, Password};

/// SecureFastChat client.
#[derive(Parser, Debug)]
#[command(name = "sfc", version)]
struct Cli {
    /// Server address, HOST:PORT
    #[arg(
        long,
        env = "SFC_SERVER",
        default_value = "127.0.0.1:4433",
        global = true
    )]
    server: String,
    /// CA certificate to trust (PEM)
    #[arg(long, env = "SFC_CA", default_value = "certs/ca.crt", global = true)]
    ca: PathBuf,
    /// Directory for the session token and keys [default: ~/.config/securefastchat]
    #[arg(long, env = "SFC_HOME", global = true)]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an account (password from SFC_PASSWORD or a prompt) and log in
    Signup {
        /// 3-32 characters of a-z 0-9 _ . -
        user: String,
    },
    /// Log in (password from SFC_PASSWORD or a prompt)
    Login {
        /// Account name
        user: String,
    },
    /// Revoke the saved session on the server and forget it
    Logout,
    /// Show who is logged in
    Whoami,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("sfc: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sfc: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line, with a hint for the mistakes people make most.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = format!("{error:#}").replace('\n', " ");
    if let Some(client) = error.downcast_ref::<ClientError>() {
        match client {
            ClientError::CertificateNotTrusted(_) => {
                line.push_str(" (is --ca the CA that signed this server's certificate?)");
            }
            ClientError::Unreachable { .. } => line.push_str(" (is sfc-server running there?)"),
            _ => {}
        }
    }
    line
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let home_dir = cli.home.clone().unwrap_or_else(Home::default_dir);
    let home = Home::open(&home_dir)?;
    let options = ClientOptions::new(cli.server.clone(), cli.ca.clone());
    match cli.command {
        Command::Signup { user } => {
            let client = Client::connect(&options).await?;
            let (name, available) = client.check_username(&user).await?;
            if !available {
                bail!("username {name:?} is taken");
            }
            let password = read_password(true)?;
            let (session, token) = client.signup(&name, password).await?;
            save(
                &home,
                &cli.server,
                &session.username,
                token,
                session.expires_at,
            )?;
            client.close().await;
            println!("signed up and logged in as {}", session.username);
        }
        Command::Login { user } => {
            let password = read_password(false)?;
            let client = Client::connect(&options).await?;
            let (session, token) = client.login(&user, password).await?;
            save(
                &home,
                &cli.server,
                &session.username,
                token,
                session.expires_at,
            )?;
            client.close().await;
            println!("logged in as {}", session.username);
        }
        Command::Whoami => {
            let saved = home
                .load_session()?
                .context("not logged in (run `sfc login USER`)")?;
            let client = Client::connect(&options).await?;
            let session = match client.resume(saved.token).await {
                Err(e) if e.is_server(ErrorCode::InvalidToken) => {
                    home.clear_session()?;
                    bail!(
                        "session expired or revoked (run `sfc login {}`)",
                        saved.username
                    );
                }
                other => other?,
            };
            client.close().await;
            println!("{}", session.username);
        }
        Command::Logout => {
            let Some(saved) = home.load_session()? else {
                println!("not logged in");
                return Ok(());
            };
            let client = Client::connect(&options).await?;
            match client.resume(saved.token).await {
                Ok(_) => client.logout().await?,
                Err(e) if e.is_server(ErrorCode::InvalidToken) => {}
                Err(e) => return Err(e.into()),
            }
            client.close().await;
            home.clear_session()?;
            println!("logged out {}", saved.username);
        }
    }
    Ok(())
}

fn save(
    home: &Home,
    server: &str,
    username: &str,
    token: securefastchat::protocol::SessionToken,
    expires_at: u64,
) -> anyhow::Result<()> {
    let session = SavedSession {
        server: server.to_owned(),
        username: username.to_owned(),
        token,
        expires_at,
    };
    home.save_session(&session)
        .with_context(|| format!("saving the session in {}", home.dir().display()))
}

/// The password from SFC_PASSWORD, or a no-echo prompt (asked twice for a new password).
fn read_password(new: bool) -> anyhow::Result<Password> {
    if let Ok(password) = std::env::var("SFC_PASSWORD") {
        return Ok(Password::new(password));
    }
    if !std::io::stdin().is_terminal() {
        bail!("no password: set SFC_PASSWORD or run in a terminal");
    }
    let password = rpassword::prompt_password("Password: ").context("reading the password")?;
    if new {
        let again =
            rpassword::prompt_password("Repeat password: ").context("reading the password")?;
        if again != password {
            bail!("passwords do not match");
        }
    }
    Ok(Password::new(password))
}
