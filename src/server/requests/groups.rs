//! The MLS requests of a device (docs/PROTOCOL.md 5.7): key packages and groups.

use super::{Control, error};
use crate::protocol::{ErrorCode, Reply, Request};
use crate::server::accounts::ActiveSession;

impl Control {
    pub(super) async fn group_request(
        &mut self,
        _session: &ActiveSession,
        request: Request,
    ) -> Reply {
        error(
            ErrorCode::UnknownRequest,
            format!("{} is not served yet", request.kind().as_str()),
        )
    }
}
