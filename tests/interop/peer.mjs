// A js-libp2p peer driven by ocf's interop tests over stdin/stdout (JSON lines).
// stdout carries only JSON; diagnostics go to stderr.
// Node 20: js-libp2p 3 uses Promise.withResolvers (Node 22), so polyfill it
// before importing anything from libp2p.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

// Node 20 has no global WebSocket (Node 22 does); js-libp2p's dialer needs one.
if (typeof globalThis.WebSocket !== 'function') {
  globalThis.WebSocket = (await import('ws')).WebSocket
}

const { createLibp2p } = await import('libp2p')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { tcp } = await import('@libp2p/tcp')
const { webSockets } = await import('@libp2p/websockets')
const { ping } = await import('@libp2p/ping')
const { identify } = await import('@libp2p/identify')
const { circuitRelayServer, circuitRelayTransport } = await import('@libp2p/circuit-relay-v2')
const { dcutr } = await import('@libp2p/dcutr')
const { autoNAT } = await import('@libp2p/autonat')
const { multiaddr } = await import('@multiformats/multiaddr')
const { createHash } = await import('node:crypto')
const readline = await import('node:readline')
const { readFileSync } = await import('node:fs')

const ECHO = '/ocf/echo/1.0.0'

// OCF_JS_SWARM_KEY_FILE: run in a private network (@libp2p/pnet) with this swarm.key.
const swarmKeyFile = process.env.OCF_JS_SWARM_KEY_FILE
const privateNetwork = {}
if (swarmKeyFile) {
  const { preSharedKey } = await import('@libp2p/pnet')
  privateNetwork.connectionProtector = preSharedKey({ psk: new Uint8Array(readFileSync(swarmKeyFile)) })
}

// OCF_JS_DHT=server|client: run @libp2p/kad-dht on OCF_JS_DHT_PROTOCOL (default /ipfs/kad/1.0.0).
// Loopback addresses are kept (passthroughMapper): the interop tests run on 127.0.0.1.
const dhtMode = process.env.OCF_JS_DHT
const dhtServices = {}
let peerIdFromString
if (dhtMode) {
  const { kadDHT, passthroughMapper } = await import('@libp2p/kad-dht')
  ;({ peerIdFromString } = await import('@libp2p/peer-id'))
  dhtServices.dht = kadDHT({
    protocol: process.env.OCF_JS_DHT_PROTOCOL || '/ipfs/kad/1.0.0',
    clientMode: dhtMode === 'client',
    peerInfoMapper: passthroughMapper,
    allowQueryWithZeroPeers: false
  })
}
// QUIC (@chainsafe/libp2p-quic, a native binary in the npm package), except in a
// private network: pnet protects byte streams and QUIC has none.
// OCF_JS_LISTEN=<addr>,<addr>: listen on these instead (the DCUtR tests' public-looking segment).
const listen = process.env.OCF_JS_LISTEN
  ? process.env.OCF_JS_LISTEN.split(',')
  : ['/ip4/127.0.0.1/tcp/0', '/ip4/127.0.0.1/tcp/0/ws']
const transports = [tcp(), webSockets()]
if (!swarmKeyFile) {
  const { quic } = await import('@chainsafe/libp2p-quic')
  if (!process.env.OCF_JS_LISTEN) listen.push('/ip4/127.0.0.1/udp/0/quic-v1')
  transports.push(quic())
}

// OCF_JS_RELAY=1: also serve circuit relay v2 (hop), with js-libp2p's default limits.
// OCF_JS_RELAY_LISTEN=<relay addr>/p2p-circuit: reserve on that relay and listen through it.
// Every peer can dial /p2p-circuit addresses and runs DCUtR and AutoNAT (v1).
const relayServer = process.env.OCF_JS_RELAY === '1' ? { relay: circuitRelayServer() } : {}
// OCF_JS_AUTONAT_V2=1: also run @libp2p/autonat-v2 (client and server).
const autonatV2 = {}
if (process.env.OCF_JS_AUTONAT_V2 === '1') {
  const { autoNATv2 } = await import('@libp2p/autonat-v2')
  autonatV2.autonatV2 = autoNATv2()
}
if (process.env.OCF_JS_RELAY_LISTEN) listen.push(process.env.OCF_JS_RELAY_LISTEN)
transports.push(circuitRelayTransport())

// OCF_JS_ANNOUNCE=<addr>,<addr>: announce these as verified (js announces a public listen address only
// once AutoNAT confirmed it; the DCUtR tests' segment has no AutoNAT servers).
const appendAnnounce = process.env.OCF_JS_ANNOUNCE ? process.env.OCF_JS_ANNOUNCE.split(',') : []

const node = await createLibp2p({
  ...privateNetwork,
  addresses: { listen, appendAnnounce },
  transports,
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    // libp2p's connection monitor pings every connection every 10 s on this same
    // protocol; ping's default of one outbound stream per connection makes a
    // test's ping fail whenever the two meet ("Too many outbound protocol streams").
    ping: ping({ maxOutboundStreams: 4, maxInboundStreams: 4 }),
    identify: identify(),
    dcutr: dcutr(),
    autonat: autoNAT(),
    ...relayServer,
    ...autonatV2,
    ...dhtServices
  },
  connectionGater: { denyDialMultiaddr: async () => false }
})

// Echo every byte back; close our write side when the remote closes its.
await node.handle(ECHO, async (stream) => {
  try {
    for await (const chunk of stream) {
      const buf = chunk.subarray ? chunk.subarray() : chunk
      if (!stream.send(buf)) await stream.onDrain()
    }
    await stream.close()
  } catch (err) {
    process.stderr.write(`echo handler: ${err}\n`)
  }
}, { maxInboundStreams: 256, runOnLimitedConnection: true })

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

function pattern (n) {
  const buf = new Uint8Array(n)
  for (let i = 0; i < n; i++) buf[i] = i % 251
  return buf
}

const commands = {
  async ping ({ addr, count = 1 }) {
    const ma = multiaddr(addr)
    const rtts = []
    for (let i = 0; i < count; i++) rtts.push(await node.services.ping.ping(ma))
    return { rtts }
  },
  async identify ({ addr }) {
    const conn = await node.dial(multiaddr(addr))
    const result = await node.services.identify.identify(conn)
    return {
      peerId: result.peerId.toString(),
      agentVersion: result.agentVersion,
      protocolVersion: result.protocolVersion,
      protocols: result.protocols,
      listenAddrs: result.listenAddrs.map(String),
      observedAddr: result.observedAddr ? String(result.observedAddr) : null
    }
  },
  async echo ({ addr, bytes }) {
    const data = pattern(bytes)
    const started = performance.now()
    const stream = await node.dialProtocol(multiaddr(addr), ECHO, { runOnLimitedConnection: true })
    const received = []
    let total = 0
    const reading = (async () => {
      for await (const chunk of stream) {
        const buf = chunk.subarray ? chunk.subarray() : chunk
        received.push(Buffer.from(buf))
        total += buf.byteLength
      }
    })()
    const CHUNK = 64 * 1024
    for (let i = 0; i < data.length; i += CHUNK) {
      if (!stream.send(data.subarray(i, i + CHUNK))) await stream.onDrain()
    }
    await stream.close()
    await reading
    const seconds = (performance.now() - started) / 1000
    const back = Buffer.concat(received)
    if (total !== bytes || !back.equals(Buffer.from(data))) {
      throw new Error(`echo mismatch: sent ${bytes} bytes, got ${total}`)
    }
    return { bytes: total, seconds, sha256: createHash('sha256').update(back).digest('hex') }
  },
  async dial ({ addr }) {
    const conn = await node.dial(multiaddr(addr))
    return { peerId: conn.remotePeer.toString() }
  },
  async dhtFindPeer ({ peerId }) {
    const info = await node.peerRouting.findPeer(peerIdFromString(peerId), { signal: AbortSignal.timeout(20000) })
    return { peerId: info.id.toString(), addrs: info.multiaddrs.map(String) }
  },
  async peerStoreAddrs ({ peerId }) {
    try {
      const peer = await node.peerStore.get(peerIdFromString(peerId))
      return { addrs: peer.addresses.map(({ multiaddr }) => String(multiaddr)) }
    } catch (err) {
      if (err.name === 'NotFoundError') return { addrs: [] }
      throw err
    }
  },
  async dhtTable () {
    const table = node.services.dht.routingTable
    return { size: table.size }
  },
  // `streams` concurrent echo streams of `bytes` each on one connection.
  async streams ({ addr, streams, bytes }) {
    const conn = await node.dial(multiaddr(addr))
    const started = performance.now()
    const one = async (i) => {
      const data = pattern(bytes).map((b) => (b + i) % 256)
      const stream = await conn.newStream(ECHO, { maxOutboundStreams: 256 })
      const received = []
      let total = 0
      const reading = (async () => {
        for await (const chunk of stream) {
          const buf = chunk.subarray ? chunk.subarray() : chunk
          received.push(Buffer.from(buf))
          total += buf.byteLength
        }
      })()
      const CHUNK = 16 * 1024
      for (let j = 0; j < data.length; j += CHUNK) {
        if (!stream.send(data.subarray(j, j + CHUNK))) await stream.onDrain()
      }
      await stream.close()
      await reading
      if (total !== bytes || !Buffer.concat(received).equals(Buffer.from(data))) {
        throw new Error(`stream ${i}: echo mismatch, got ${total} bytes`)
      }
    }
    await Promise.all(Array.from({ length: streams }, (_, i) => one(i)))
    return { streams, bytes, seconds: (performance.now() - started) / 1000, transport: conn.remoteAddr.toString() }
  },
  async peers () {
    return { peers: node.getPeers().map(String) }
  },
  async protocols () {
    return { protocols: node.getProtocols() }
  },
  async addrs () {
    return { addrs: node.getMultiaddrs().map(String) }
  },
  async connections ({ peer }) {
    return {
      connections: node.getConnections().filter(c => !peer || c.remotePeer.toString() === peer).map(c => ({
        peer: c.remotePeer.toString(), addr: String(c.remoteAddr), limited: c.limits != null, direction: c.direction
      }))
    }
  },
  async stop () {
    await node.stop()
    setTimeout(() => process.exit(0), 10)
    return {}
  }
}

out({ event: 'ready', peerId: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) })

const rl = readline.createInterface({ input: process.stdin })
rl.on('line', async (line) => {
  let req
  try { req = JSON.parse(line) } catch { return out({ ok: false, error: 'bad JSON' }) }
  const fn = commands[req.cmd]
  if (!fn) return out({ id: req.id, ok: false, error: `unknown command ${req.cmd}` })
  try {
    out({ id: req.id, ok: true, ...(await fn(req)) })
  } catch (err) {
    out({ id: req.id, ok: false, error: String(err && err.stack || err) })
  }
})
rl.on('close', async () => { await node.stop(); process.exit(0) })
