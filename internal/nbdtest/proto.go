// Package nbdtest is the NBD client of the tests, in two layers on the same
// handshake and framing code (this file):
//
//   - Conn (conn.go), for the nbd package's conformance tests: the
//     protocol's steps one at a time (greeting, options, NBD_OPT_INFO and
//     NBD_OPT_GO, requests, simple and structured replies, EOF), each
//     failing the test on a protocol violation.
//   - Client (client.go), for end-to-end tests: a pipelined client (fixed
//     newstyle, NBD_OPT_GO, simple replies) whose Read, Write and Flush
//     return a channel, so a test knows exactly which writes were
//     acknowledged and flushed, which fio does not expose.
//
// The wire constants are the NBD protocol's (NetworkBlockDevice/nbd
// doc/proto.md). Package nbd keeps its own, unexported: its tests import
// this package, so it cannot import nbd.
package nbdtest

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Handshake magics and flags.
const (
	// Magic opens the server's greeting ("NBDMAGIC").
	Magic = 0x4e42444d41474943
	// OptMagic opens the newstyle greeting and every client option ("IHAVEOPT").
	OptMagic = 0x49484156454f5054
	// OptReplyMagic opens every option reply.
	OptReplyMagic = 0x0003e889045565a9

	// FlagFixedNewstyle is the server's NBD_FLAG_FIXED_NEWSTYLE.
	FlagFixedNewstyle = 1 << 0
	// FlagNoZeroes is the server's NBD_FLAG_NO_ZEROES.
	FlagNoZeroes = 1 << 1

	// ClientFlagFixedNewstyle is the client's NBD_FLAG_C_FIXED_NEWSTYLE.
	ClientFlagFixedNewstyle = 1 << 0
	// ClientFlagNoZeroes is the client's NBD_FLAG_C_NO_ZEROES.
	ClientFlagNoZeroes = 1 << 1
)

// Options and option replies.
const (
	// OptGo is NBD_OPT_GO.
	OptGo = 7
	// OptStructuredReply is NBD_OPT_STRUCTURED_REPLY.
	OptStructuredReply = 8

	// RepAck is NBD_REP_ACK.
	RepAck = 1
	// RepInfo is NBD_REP_INFO.
	RepInfo = 3
	// RepFlagError marks the error replies (NBD_REP_FLAG_ERROR).
	RepFlagError = 1 << 31

	// InfoExport is NBD_INFO_EXPORT: size (8 bytes) and transmission flags (2).
	InfoExport = 0
	// InfoBlockSize is NBD_INFO_BLOCK_SIZE.
	InfoBlockSize = 3
)

// Commands.
const (
	// CmdRead is NBD_CMD_READ.
	CmdRead = 0
	// CmdWrite is NBD_CMD_WRITE.
	CmdWrite = 1
	// CmdDisc is NBD_CMD_DISC.
	CmdDisc = 2
	// CmdFlush is NBD_CMD_FLUSH.
	CmdFlush = 3
)

// Transmission magics and structured reply chunks.
const (
	// RequestMagic opens every request.
	RequestMagic = 0x25609513
	// SimpleReplyMagic opens every simple reply.
	SimpleReplyMagic = 0x67446698
	// StructuredReplyMagic opens every structured reply chunk.
	StructuredReplyMagic = 0x668e33ef

	// ReplyFlagDone is NBD_REPLY_FLAG_DONE: the chunk is the reply's last.
	ReplyFlagDone = 1 << 0
	// ReplyTypeNone is NBD_REPLY_TYPE_NONE.
	ReplyTypeNone = 0
	// ReplyTypeOffsetData is NBD_REPLY_TYPE_OFFSET_DATA.
	ReplyTypeOffsetData = 1
	// ReplyTypeError is NBD_REPLY_TYPE_ERROR.
	ReplyTypeError = 1<<15 + 1
)

// Errno is an NBD error a server answered a request with.
type Errno uint32

// Error says "nbd error N", N the NBD errno (the tests match on it).
func (e Errno) Error() string { return fmt.Sprintf("nbd error %d", uint32(e)) }

// ReadGreeting reads the server's fixed newstyle greeting and returns its
// handshake flags.
func ReadGreeting(r io.Reader) (uint16, error) {
	var hello [18]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil {
		return 0, fmt.Errorf("nbd greeting: %w", err)
	}
	if binary.BigEndian.Uint64(hello[:]) != Magic || binary.BigEndian.Uint64(hello[8:]) != OptMagic {
		return 0, fmt.Errorf("nbd greeting: bad magic %x", hello[:16])
	}
	return binary.BigEndian.Uint16(hello[16:]), nil
}

// AppendClientFlags appends the client's 4 bytes of handshake flags.
func AppendClientFlags(b []byte, flags uint32) []byte {
	return binary.BigEndian.AppendUint32(b, flags)
}

// AppendOption appends one client option: magic, option, length and data.
func AppendOption(b []byte, opt uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, OptMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// OptReply is one option reply.
type OptReply struct {
	Opt  uint32 // the option it answers
	Type uint32 // NBD_REP_*
	Data []byte
}

// ReadOptReply reads one option reply.
func ReadOptReply(r io.Reader) (OptReply, error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return OptReply{}, fmt.Errorf("nbd option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[:]); m != OptReplyMagic {
		return OptReply{}, fmt.Errorf("nbd option reply magic %#x", m)
	}
	rep := OptReply{Opt: binary.BigEndian.Uint32(h[8:]), Type: binary.BigEndian.Uint32(h[12:]),
		Data: make([]byte, binary.BigEndian.Uint32(h[16:]))}
	if _, err := io.ReadFull(r, rep.Data); err != nil {
		return OptReply{}, fmt.Errorf("nbd option reply data: %w", err)
	}
	return rep, nil
}

// InfoData is the data of NBD_OPT_INFO and NBD_OPT_GO: the export name and
// the NBD_INFO types asked for.
func InfoData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// Export is what the replies to NBD_OPT_INFO or NBD_OPT_GO said.
type Export struct {
	Size  uint64            // from NBD_INFO_EXPORT, once acknowledged
	Flags uint16            // transmission flags, from NBD_INFO_EXPORT
	Infos map[uint16][]byte // every NBD_REP_INFO payload by NBD_INFO type
}

// ReadInfoReplies reads the replies to an NBD_OPT_INFO or NBD_OPT_GO (opt)
// up to the final one, which it returns with the NBD_REP_INFO payloads. On
// NBD_REP_ACK the export's size and flags are decoded: an ACK without
// NBD_INFO_EXPORT is an error.
func ReadInfoReplies(r io.Reader, opt uint32) (Export, OptReply, error) {
	exp := Export{Infos: map[uint16][]byte{}}
	for {
		rep, err := ReadOptReply(r)
		if err != nil {
			return exp, rep, err
		}
		if rep.Opt != opt {
			return exp, rep, fmt.Errorf("nbd: reply for option %d, want %d", rep.Opt, opt)
		}
		if rep.Type != RepInfo {
			if rep.Type == RepAck {
				e := exp.Infos[InfoExport]
				if len(e) != 10 {
					return exp, rep, fmt.Errorf("nbd: NBD_INFO_EXPORT missing or %d bytes", len(e))
				}
				exp.Size = binary.BigEndian.Uint64(e)
				exp.Flags = binary.BigEndian.Uint16(e[8:])
			}
			return exp, rep, nil
		}
		if len(rep.Data) < 2 {
			return exp, rep, errors.New("nbd: short NBD_REP_INFO")
		}
		exp.Infos[binary.BigEndian.Uint16(rep.Data)] = rep.Data[2:]
	}
}

// Go sends NBD_OPT_GO for export, asking for infos, and reads its replies:
// the export as the server described it, or an error if it refused.
func Go(rw io.ReadWriter, export string, infos ...uint16) (Export, error) {
	if _, err := rw.Write(AppendOption(nil, OptGo, InfoData(export, infos...))); err != nil {
		return Export{}, fmt.Errorf("nbd: send NBD_OPT_GO: %w", err)
	}
	exp, rep, err := ReadInfoReplies(rw, OptGo)
	if err != nil {
		return exp, err
	}
	if rep.Type != RepAck {
		return exp, fmt.Errorf("nbd: NBD_OPT_GO refused: reply type %#x %q", rep.Type, rep.Data)
	}
	return exp, nil
}

// RequestSize is the size of a request header.
const RequestSize = 28

// AppendRequest appends one request header (a write's payload follows it).
func AppendRequest(b []byte, typ, flags uint16, cookie, off uint64, length uint32) []byte {
	b = binary.BigEndian.AppendUint32(b, RequestMagic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, length)
}

// ReadSimpleReply reads the header of a simple reply; a read's data
// follows it unless errno is set.
func ReadSimpleReply(r io.Reader) (cookie uint64, errno uint32, err error) {
	var h [16]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, 0, fmt.Errorf("nbd simple reply: %w", err)
	}
	if m := binary.BigEndian.Uint32(h[:]); m != SimpleReplyMagic {
		return 0, 0, fmt.Errorf("nbd simple reply magic %#x", m)
	}
	return binary.BigEndian.Uint64(h[8:]), binary.BigEndian.Uint32(h[4:]), nil
}

// Chunk is one structured reply chunk.
type Chunk struct {
	Flags   uint16 // NBD_REPLY_FLAG_*
	Type    uint16 // NBD_REPLY_TYPE_*
	Cookie  uint64
	Payload []byte
}

// ReadChunk reads one structured reply chunk.
func ReadChunk(r io.Reader) (Chunk, error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Chunk{}, fmt.Errorf("nbd structured reply: %w", err)
	}
	if m := binary.BigEndian.Uint32(h[:]); m != StructuredReplyMagic {
		return Chunk{}, fmt.Errorf("nbd structured reply magic %#x", m)
	}
	c := Chunk{Flags: binary.BigEndian.Uint16(h[4:]), Type: binary.BigEndian.Uint16(h[6:]),
		Cookie: binary.BigEndian.Uint64(h[8:]), Payload: make([]byte, binary.BigEndian.Uint32(h[16:]))}
	if _, err := io.ReadFull(r, c.Payload); err != nil {
		return Chunk{}, fmt.Errorf("nbd structured reply payload: %w", err)
	}
	return c, nil
}
