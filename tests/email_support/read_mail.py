"""An independent parser for what the SMTP server received: Python's email
package prints the headers and parts of one message as JSON."""
import email, email.policy, hashlib, json, sys

msg = email.message_from_binary_file(open(sys.argv[1], "rb"), policy=email.policy.default)
parts = []
for p in msg.walk():
    if p.is_multipart():
        continue
    entry = {"content_type": p.get_content_type(), "filename": p.get_filename()}
    if p.get_content_maintype() == "text":
        entry["text"] = p.get_content()
    else:
        data = p.get_payload(decode=True) or b""
        entry["size"] = len(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    parts.append(entry)
print(json.dumps({
    "from": str(msg["From"]),
    "to": str(msg["To"]),
    "reply_to": str(msg["Reply-To"]),
    "subject": str(msg["Subject"]),
    "message_id": str(msg["Message-ID"]),
    "in_reply_to": msg["In-Reply-To"] and str(msg["In-Reply-To"]),
    "references": msg["References"] and str(msg["References"]),
    "parts": parts,
    # Every part's type, containers included, in walk order.
    "structure": [p.get_content_type() for p in msg.walk()],
}))
