//! The messages between callers and aggregate actors.

use actix::Message;
use tokio::sync::oneshot;

use super::command::{CommandOptions, Committed};
use super::error::CommandError;
use crate::domain::Aggregate;

/// A read of an aggregate's state, run inside its actor between commands.
pub(crate) type Inspector<A> = Box<dyn FnOnce(&A, u64) + Send>;

/// What a caller asks of an aggregate actor.
pub(crate) enum WorkKind<A: Aggregate> {
    /// Decide, persist, apply, reply.
    Command {
        command: A::Command,
        options: CommandOptions,
        /// Set when the command is decided again after a version conflict; a second conflict is
        /// reported instead of retried.
        redecided: bool,
    },
    /// Run a read of the persisted state.
    Inspect(Inspector<A>),
    /// Finish what is queued before this, then stop (graceful shutdown).
    Stop,
}

/// The result of one attempt to deliver work.
pub(crate) enum Attempt<A: Aggregate> {
    /// The actor processed the work.
    Done(Result<Committed<A::Event>, CommandError<A::Error>>),
    /// The actor was stopping and did not process it: deliver it to the next incarnation.
    Bounced(WorkKind<A>),
}

pub(crate) type ReplyTx<A> = oneshot::Sender<Attempt<A>>;

/// One unit of work with the channel its outcome goes back on.
pub(crate) struct Work<A: Aggregate> {
    pub(crate) kind: WorkKind<A>,
    pub(crate) reply: ReplyTx<A>,
}

impl<A: Aggregate> Work<A> {
    /// Hands the work back unprocessed; the caller re-routes it.
    pub(crate) fn bounce(self) {
        let _ = self.reply.send(Attempt::Bounced(self.kind));
    }
}

/// The actix message carrying work to an actor.
///
/// If it is dropped undelivered (it sat in the mailbox of an actor that stopped), its work is
/// bounced back to the caller, so passivation never loses a message: the caller delivers it to
/// the next incarnation.
pub(crate) struct Deliver<A: Aggregate>(pub(crate) Option<Work<A>>);

impl<A: Aggregate> Message for Deliver<A> {
    type Result = ();
}

impl<A: Aggregate> Drop for Deliver<A> {
    fn drop(&mut self) {
        if let Some(work) = self.0.take() {
            work.bounce();
        }
    }
}

/// An actor's note to itself to decide what it queued, after the messages already in its
/// mailbox (so work arriving together is decided together).
pub(crate) struct Drive;

impl Message for Drive {
    type Result = ();
}

/// Asks an actor to stop if it is idle; `force` ignores the idle timeout (live-actor limit).
pub(crate) struct Passivate {
    pub(crate) force: bool,
}

impl Message for Passivate {
    type Result = ();
}
