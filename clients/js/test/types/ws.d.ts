// Minimal typing of the `ws` package for the compile check (no @types dependency).
declare module "ws" {
  const WebSocket: new (url: string) => unknown;
  export default WebSocket;
}
