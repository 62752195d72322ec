/**
 * Text from other people, made safe to print on a terminal: control characters (C0 but tab, DEL,
 * C1) and bidirectional controls are shown as `\uXXXX`, so a message can neither send escape
 * sequences to the terminal (clipboard writes, titles, cursor moves) nor print a line break and
 * a line that looks like someone else's.
 */
const UNPRINTABLE = /[\u0000-\u0008\u000a-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g;

export function printable(text: unknown): string {
  return String(text).replace(UNPRINTABLE, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}
