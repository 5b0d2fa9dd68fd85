// A scriptable SMSC for gatewayd-smpp's tests, built on the npm `smpp` package (0.5.1),
// so the ESME under test talks to an SMPP implementation we did not write.
//
// argv[2]: port to listen on (0 = any). First stdout line: "listening PORT".
// Then stdout carries one JSON event per line; stdin takes one JSON command per line.
// Commands: see handle() below. Every short message is sent with an explicit
// data_coding: node-smpp would otherwise relabel GSM text as data_coding 1.
'use strict';

const smpp = require('smpp');
const readline = require('readline');

const state = {
  session: null,        // the most recently bound session
  bindStatus: 0,        // answer binds with this status
  submitStatuses: [],   // statuses for the next submit_sm, FIFO, then ESME_ROK
  autoReceipt: null,    // {state, stat}: send a receipt after each accepted submit_sm
  holdSubmits: false,   // do not answer submit_sm at all (response timeout tests)
  nextId: 1,
};

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

function hexList(udh) {
  return (udh || []).map((b) => b.toString('hex'));
}

function textOf(sm) {
  if (sm === undefined || sm === null) return {message: '', udh: []};
  if (typeof sm === 'string') return {message: sm, udh: []};
  if (Buffer.isBuffer(sm)) return {message: sm.toString('hex'), udh: []};
  return {message: String(sm.message), udh: hexList(sm.udh)};
}

const server = smpp.createServer({debug: false}, (session) => {
  session.on('bind_transceiver', (pdu) => {
    const status = state.bindStatus;
    emit({event: 'bind', system_id: pdu.system_id, password: pdu.password,
      system_type: pdu.system_type, status});
    session.send(pdu.response({command_status: status, system_id: 'node-smsc'}));
    if (status === 0) {
      state.session = session;
    } else {
      session.close();
    }
  });
  session.on('enquire_link', (pdu) => {
    emit({event: 'enquire_link'});
    session.send(pdu.response());
  });
  session.on('unbind', (pdu) => {
    emit({event: 'unbind'});
    session.send(pdu.response());
    session.close();
  });
  session.on('submit_sm', (pdu) => {
    const {message, udh} = textOf(pdu.short_message);
    const status = state.submitStatuses.length ? state.submitStatuses.shift() : 0;
    const messageId = status === 0 ? 'M' + (state.nextId++).toString(16).padStart(6, '0') : '';
    emit({event: 'submit_sm', source_addr: pdu.source_addr, destination_addr: pdu.destination_addr,
      dest_addr_ton: pdu.dest_addr_ton, data_coding: pdu.data_coding, esm_class: pdu.esm_class,
      registered_delivery: pdu.registered_delivery, message, udh, status, message_id: messageId});
    if (state.holdSubmits) return;
    session.send(pdu.response({command_status: status, message_id: messageId}));
    if (status === 0 && state.autoReceipt && pdu.registered_delivery) {
      receipt(session, messageId, pdu.destination_addr, state.autoReceipt);
    }
  });
  session.on('close', () => emit({event: 'close'}));
  session.on('error', (err) => emit({event: 'error', error: String(err)}));
});

function receipt(session, messageId, source, r) {
  const text = `id:${messageId} sub:001 dlvrd:${r.state === 2 ? '001' : '000'} ` +
    `submit date:2401010000 done date:2401010001 stat:${r.stat} err:${r.err || '000'} text:`;
  const fields = {source_addr: source, destination_addr: 'gw', esm_class: 0x04, data_coding: 0,
    short_message: text};
  if (!r.textOnly) {
    fields.receipted_message_id = messageId;
    fields.message_state = r.state;
  }
  session.deliver_sm(fields, (resp) => emit({event: 'receipt_resp', message_id: messageId,
    status: resp.command_status}));
}

function handle(cmd) {
  const session = state.session;
  switch (cmd.op) {
    case 'mo': {
      const fields = {source_addr: cmd.source, source_addr_ton: 1, source_addr_npi: 1,
        destination_addr: cmd.dest || '4000', esm_class: cmd.esm_class || 0,
        data_coding: cmd.data_coding};
      let body = cmd.udh ? {udh: Buffer.from(cmd.udh, 'hex'), message: cmd.text} : cmd.text;
      if (cmd.hex !== undefined) body = Buffer.from(cmd.hex, 'hex');  // raw octets
      if (cmd.payload_tlv) fields.message_payload = body; else fields.short_message = body;
      for (const [key, value] of Object.entries(cmd.tlvs || {})) fields[key] = value;
      const sent = session && session.deliver_sm(fields, (resp) => emit({event: 'deliver_sm_resp',
        id: cmd.id, status: resp.command_status}));
      if (!sent) emit({event: 'not_sent', id: cmd.id});
      break;
    }
    case 'receipt':
      receipt(session, cmd.message_id, cmd.source, cmd);
      break;
    case 'submit_statuses':
      state.submitStatuses.push(...cmd.statuses);
      break;
    case 'auto_receipt':
      state.autoReceipt = cmd.receipt;
      break;
    case 'hold_submits':
      state.holdSubmits = cmd.hold;
      break;
    case 'bind_status':
      state.bindStatus = cmd.status;
      break;
    case 'unbind':
      session.unbind((resp) => emit({event: 'unbind_resp', status: resp.command_status}));
      break;
    case 'drop':
      // A crash of the link: no unbind, the socket just goes away.
      for (const s of server.sessions.slice()) s.destroy();
      state.session = null;
      break;
    default:
      emit({event: 'error', error: 'unknown op ' + cmd.op});
  }
  emit({event: 'done', op: cmd.op, seq: cmd.seq});
}

readline.createInterface({input: process.stdin}).on('line', (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  try {
    handle(cmd);
  } catch (err) {
    // Report, never die: the test then fails on its own assertion, with this in view.
    emit({event: 'error', error: String(err)});
    emit({event: 'done', op: cmd.op, seq: cmd.seq});
  }
});
process.stdin.on('end', () => process.exit(0));

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
