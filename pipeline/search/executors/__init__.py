"""Where trials run: one at a time here (`local`), several in one pack (`packed`), on Ray workers (`ray`, `mailbox`)."""
