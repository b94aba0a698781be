package nbd

// The fixed newstyle handshake.
//
// Invariants:
//   - The handshake reads exactly the bytes the client sent for each option
//     (no read-ahead), so the transmission phase starts on a request boundary.
//   - Every option gets exactly one final reply (ACK or an error), except
//     NBD_OPT_EXPORT_NAME which has its own reply format, and options whose
//     length is absurd, which end the connection.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// errAbort reports that the client ended the handshake with NBD_OPT_ABORT or
// asked for an unknown export with NBD_OPT_EXPORT_NAME.
var errAbort = errors.New("nbd: client aborted the handshake")

// handshakeResult is what the client negotiated.
type handshakeResult struct {
	export     *Export
	structured bool
}

// findExport returns the export called name; "" means the first one.
func (s *Server) findExport(name string) *Export {
	if name == "" {
		return &s.exports[0]
	}
	for i := range s.exports {
		if s.exports[i].Name == name {
			return &s.exports[i]
		}
	}
	return nil
}

// transmissionFlags are the flags advertised for e.
func transmissionFlags(e *Export) uint16 {
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendWriteZeroes | tflagCanMultiConn)
	if e.ReadOnly {
		f |= tflagReadOnly
	}
	return f
}

// handshake runs option haggling on rw until the client picks an export
// (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), aborts, or breaks the protocol.
func (s *Server) handshake(rw io.ReadWriter) (handshakeResult, error) {
	var res handshakeResult
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], nbdMagic)
	binary.BigEndian.PutUint64(hello[8:], optMagic)
	binary.BigEndian.PutUint16(hello[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := rw.Write(hello[:]); err != nil {
		return res, fmt.Errorf("nbd: sending greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(rw, cf[:]); err != nil {
		return res, fmt.Errorf("nbd: reading client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^clientFlagsKnown != 0 || clientFlags&clientFlagFixedNewstyle == 0 {
		return res, fmt.Errorf("nbd: unsupported client flags %#x", clientFlags)
	}
	noZeroes := clientFlags&clientFlagNoZeroes != 0

	var hdr [16]byte
	var out []byte
	reply := func(opt, typ uint32, data []byte) error {
		out = appendOptionReply(out[:0], opt, typ, data)
		if _, err := rw.Write(out); err != nil {
			return fmt.Errorf("nbd: option reply: %w", err)
		}
		return nil
	}
	for {
		if _, err := io.ReadFull(rw, hdr[:]); err != nil {
			return res, fmt.Errorf("nbd: reading option: %w", err)
		}
		oh, err := parseOptionHeader(hdr[:])
		if err != nil {
			return res, err
		}
		if oh.length > maxOptionLen {
			return res, fmt.Errorf("nbd: option %d with absurd length %d", oh.opt, oh.length)
		}
		data := make([]byte, oh.length)
		if _, err := io.ReadFull(rw, data); err != nil {
			return res, fmt.Errorf("nbd: reading option %d data: %w", oh.opt, err)
		}
		switch oh.opt {
		case optExportName:
			e := s.findExport(string(data))
			if e == nil {
				// The protocol has no error reply here: hang up.
				return res, fmt.Errorf("%w: unknown export %q", errAbort, data)
			}
			b := binary.BigEndian.AppendUint64(nil, uint64(e.Volume.Size()))
			b = binary.BigEndian.AppendUint16(b, transmissionFlags(e))
			if !noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			if _, err := rw.Write(b); err != nil {
				return res, fmt.Errorf("nbd: export reply: %w", err)
			}
			res.export = e
			return res, nil
		case optAbort:
			_ = reply(oh.opt, repAck, nil) // best effort: the client may be gone
			return res, errAbort
		case optList:
			if len(data) != 0 {
				err = reply(oh.opt, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
				break
			}
			for i := range s.exports {
				e := &s.exports[i]
				d := binary.BigEndian.AppendUint32(nil, uint32(len(e.Name)))
				d = append(d, e.Name...)
				d = append(d, e.Description...)
				if err = reply(oh.opt, repServer, d); err != nil {
					break
				}
			}
			if err == nil {
				err = reply(oh.opt, repAck, nil)
			}
		case optStartTLS:
			err = reply(oh.opt, repErrPolicy, []byte("TLS is not supported"))
		case optInfo, optGo:
			var done bool
			done, err = s.replyInfo(oh.opt, data, reply)
			if err == nil && done && oh.opt == optGo {
				req, _ := parseInfoRequest(data)
				res.export = s.findExport(req.name)
				return res, nil
			}
		case optStructuredReply:
			if len(data) != 0 {
				err = reply(oh.opt, repErrInvalid, []byte("NBD_OPT_STRUCTURED_REPLY takes no data"))
				break
			}
			res.structured = true
			err = reply(oh.opt, repAck, nil)
		default:
			err = reply(oh.opt, repErrUnsup, nil)
		}
		if err != nil {
			return res, err
		}
	}
}

// replyInfo answers NBD_OPT_INFO or NBD_OPT_GO. done reports that the export
// was found and the final ACK sent.
func (s *Server) replyInfo(opt uint32, data []byte, reply func(opt, typ uint32, data []byte) error) (done bool, err error) {
	req, perr := parseInfoRequest(data)
	if perr != nil {
		return false, reply(opt, repErrInvalid, []byte("malformed info request"))
	}
	e := s.findExport(req.name)
	if e == nil {
		return false, reply(opt, repErrUnknown, []byte("no such export"))
	}
	var wantName, wantDesc bool
	for _, t := range req.infos {
		switch t {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	d := binary.BigEndian.AppendUint16(nil, infoExport)
	d = binary.BigEndian.AppendUint64(d, uint64(e.Volume.Size()))
	d = binary.BigEndian.AppendUint16(d, transmissionFlags(e))
	if err := reply(opt, repInfo, d); err != nil {
		return false, err
	}
	if wantName {
		d = binary.BigEndian.AppendUint16(d[:0], infoName)
		d = append(d, e.Name...)
		if err := reply(opt, repInfo, d); err != nil {
			return false, err
		}
	}
	if wantDesc {
		d = binary.BigEndian.AppendUint16(d[:0], infoDescription)
		d = append(d, e.Description...)
		if err := reply(opt, repInfo, d); err != nil {
			return false, err
		}
	}
	d = binary.BigEndian.AppendUint16(d[:0], infoBlockSize)
	d = binary.BigEndian.AppendUint32(d, uint32(e.Volume.BlockSize()))
	d = binary.BigEndian.AppendUint32(d, blockSize)
	d = binary.BigEndian.AppendUint32(d, uint32(s.opt.MaxPayload))
	if err := reply(opt, repInfo, d); err != nil {
		return false, err
	}
	return true, reply(opt, repAck, nil)
}
